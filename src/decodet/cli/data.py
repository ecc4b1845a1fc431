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
    register_formats(data)


def _cmd_data_convert(args: argparse.Namespace) -> int:
    from decodet.data.convert import convert_dataset

    report = convert_dataset(args.src, args.dst, args.to, link=args.link)
    for split, n in report.images.items():
        print(f"{split}: {n} images, {report.boxes[split]} boxes")
    for what, n in report.left_out.items():
        print(f"left out {n} {what}")
    print(f"wrote {args.to} dataset (from {report.source_format}) to {args.dst}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from decodet.data.check import check_dataset

    result = check_dataset(args.data, plot=args.plot)
    print(result.text)
    return 1 if result.problems else 0


def register_formats(data: argparse._SubParsersAction) -> None:
    """``decodet data convert`` and ``decodet data check``."""
    convert = data.add_parser("convert", help="convert a dataset (COCO, YOLO, VOC) to COCO or YOLO")
    convert.add_argument("src", help="dataset folder or data.yaml (any format --data accepts)")
    convert.add_argument("dst", type=Path, help="new folder to write (absent or empty)")
    convert.add_argument("--to", required=True, choices=["coco", "yolo"])
    convert.add_argument("--link", action="store_true", help="hard-link images instead of copying them")
    convert.set_defaults(func=_cmd_data_convert)
    check = data.add_parser(
        "check", help="validate a dataset, print a summary, its warnings and problems (exit 1 if any problem)"
    )
    check.add_argument("data", help="dataset folder or data.yaml (COCO, YOLO or VOC)")
    check.add_argument("--plot", type=Path, default=Path("data_check.png"), help="PNG of class and size histograms")
    check.set_defaults(func=_cmd_data_check)
