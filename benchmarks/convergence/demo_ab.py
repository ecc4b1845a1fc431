"""The demo's recipe with one change, at the demo's budget (issue 19's ``make demo`` target).

    python benchmarks/convergence/demo_ab.py --name imgsz160 --set imgsz=160 --set epochs=40
    python benchmarks/convergence/demo_ab.py --name demo            # the demo exactly as `make demo`

Each run trains :func:`decodet.demo.demo_config` (the bundled data, ``deco_tiny``, the demo's
minutes) with the ``--set`` fields replaced, into ``OUT/NAME``, and writes ``OUT/NAME.json``: the
final AP, AP50, steps, epochs, wall minutes (training, evaluations, set-up) and, from the final
evaluation's confusion matrix (IoU 0.5, score >= 0.3), the background false positives per class
(detections matching no ground truth).  A name with a result is skipped.  Values are read as
YAML (``epochs=40``, ``loss_overrides={weight_class: 2}``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

from decodet.demo import DATA, MINUTES, demo_config
from decodet.engine.train_config import parse_key_value
from decodet.engine.trainer import PLOTS_DIR, train
from decodet.io.atomic import atomic_write_text


def background_fp(run_dir: Path) -> dict[str, int]:
    """``class -> detections of that class matching nothing`` from the run's confusion matrix CSV."""
    path = run_dir / PLOTS_DIR / "confusion_matrix.csv"
    with path.open() as f:
        rows = list(csv.reader(f))
    header, background = rows[0][1:-1], rows[-1][1:-1]
    return {name: int(n) for name, n in zip(header, background)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="TrainConfig field to replace")
    ap.add_argument("--data", default="data/synth")
    ap.add_argument("--out", default="runs/demo_ab")
    ap.add_argument("--minutes", type=float, default=MINUTES)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    result_path = out / f"{args.name}.json"
    if result_path.exists():
        logging.info("%s exists; skipped", result_path)
        return 0
    if not (Path(args.data) / "data.yaml").exists():
        from decodet.data.synthetic import generate_synthetic

        generate_synthetic(args.data, **DATA)
    changes = dict(parse_key_value(item) for item in args.set)
    cfg = dataclasses.replace(demo_config(Path(args.data), out / args.name, args.minutes, None), **changes)
    start = time.monotonic()
    metrics = train(cfg)
    wall = time.monotonic() - start
    run_dir = Path(metrics.get("run_dir", out / args.name))
    fp = background_fp(run_dir)
    result = {
        "name": args.name,
        "changes": changes,
        "AP": metrics.get("AP"),
        "AP50": metrics.get("AP50"),
        "steps": metrics.get("step"),
        "epochs": metrics.get("epoch"),
        "wall_minutes": round(wall / 60, 2),
        "background_fp_per_class": fp,
        "background_fp_mean": sum(fp.values()) / max(len(fp), 1),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
    }
    atomic_write_text(result_path, json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
