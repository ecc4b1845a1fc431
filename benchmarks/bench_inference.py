"""Latency table for one model: torch eager fp32 / bf16 / compile, ONNX Runtime fp32 / int8,
and Hugging Face DETR-R50 and RT-DETR-R18 for comparison, all measured in one run.

    python benchmarks/bench_inference.py --model deco_r50 --imgsz 640 --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import platform

import torch

from decodet.bench.benchmark import format_table, rows_to_dicts, run_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deco_r50", help="preset name")
    parser.add_argument("--weights", default=None, help="checkpoint to load instead of random weights")
    parser.add_argument("--imgsz", type=int, nargs="+", default=[640], help="H W, or one side of a square")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face rows")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime rows")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    imgsz = args.imgsz[0] if len(args.imgsz) == 1 else tuple(args.imgsz[:2])
    rows = run_benchmark(
        args.model,
        imgsz=imgsz,
        batch=args.batch,
        threads=args.threads,
        warmup=args.warmup,
        iters=args.iters,
        include_hf=not args.no_hf,
        include_compile=not args.no_compile,
        include_onnx=not args.no_onnx,
        weights=args.weights,
    )
    print(
        f"# {args.model}, {imgsz}, batch {args.batch}, {args.threads} threads, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}"
    )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows_to_dicts(rows), f, indent=2)


if __name__ == "__main__":
    main()
