"""``decodet data ...``: dataset tools."""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from decodet.data.synthetic import generate_synthetic

    out = generate_synthetic(args.out, train=args.train, val=args.val, image_size=args.image_size, seed=args.seed)
    print(f"wrote synthetic dataset to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``decodet data`` and its subcommands."""
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the bundled synthetic COCO-format dataset")
    synth.add_argument("out", type=Path)
    synth.add_argument("--train", type=int, default=2000)
    synth.add_argument("--val", type=int, default=200)
    synth.add_argument("--image-size", type=int, default=320)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_cmd_data_synth)
