"""Every preset at 640x640, batch 1, torch eager fp32 on CPU: latency, GFLOPs, achieved
GFLOP/s and its fraction of the machine's fp32 matmul peak (measured in the same run).

    python benchmarks/bench_models.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging

from decodet.bench.benchmark import format_table, rows_to_dicts, survey_models
from decodet.registry import list_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None, help=f"default: all of {', '.join(list_models())}")
    parser.add_argument("--imgsz", type=int, nargs="+", default=[640], help="H W, or one side of a square")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    imgsz = args.imgsz[0] if len(args.imgsz) == 1 else tuple(args.imgsz[:2])
    rows = survey_models(args.models, imgsz, args.batch, args.threads, args.warmup, args.iters)
    print(f"# presets, {imgsz}, batch {args.batch}, {args.threads} threads, torch eager fp32")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows_to_dicts(rows), f, indent=2)


if __name__ == "__main__":
    main()
