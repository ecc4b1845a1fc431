"""Host memory (RSS) across the epochs of one training run: it should stay flat.

Trains a small model on the bundled synthetic data (written to a temporary folder) and records
the process's resident set size at the end of every epoch (after training, evaluation and the
checkpoint writes), then prints a table and the growth after the first epoch (which allocates
the allocator's pools, the model's caches and the evaluation's buffers once).

    python benchmarks/bench_memory.py                                 # deco_tiny, 128 px, 8 epochs
    python benchmarks/bench_memory.py --epochs 20 --train 64 --imgsz 256 --workers 2

A leak that keeps something per step (a loss with its graph, a growing list of detections)
shows as a steady rise per epoch; allocator noise is a few MB either way.  One bounded rise is
expected: matplotlib's text and font caches (the loss / mAP plots redrawn every epoch) add
about 45 MiB over the first ~60 epochs, then stop growing.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

from decodet.data.synthetic import generate_synthetic
from decodet.engine.train_config import TrainConfig
from decodet.engine.trainer import Trainer
from decodet.utils.console import rss_mb


class _RecordingTrainer(Trainer):
    """A Trainer that notes the RSS at the end of every epoch (where it logs the epoch)."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.rss: list[float] = []

    def _log_epoch(self, record: dict[str, Any]) -> None:
        super()._log_epoch(record)
        self.rss.append(rss_mb())


def measure(cfg: TrainConfig) -> list[float]:
    """RSS (MiB) at the end of each epoch of training ``cfg`` (single process)."""
    trainer = _RecordingTrainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer.rss


def growth(rss: list[float]) -> tuple[float, float]:
    """``(MiB gained from the end of epoch 1 to the last epoch, last / first ratio)``."""
    return rss[-1] - rss[0], rss[-1] / rss[0]


def format_table(rss: list[float]) -> str:
    lines = [f"{'epoch':>5}{'RSS MiB':>10}{'change':>9}"]
    for i, value in enumerate(rss):
        change = "" if i == 0 else f"{value - rss[i - 1]:+9.1f}"
        lines.append(f"{i + 1:>5}{value:>10.1f}{change:>9}")
    gained, ratio = growth(rss)
    lines.append(f"growth after epoch 1: {gained:+.1f} MiB (x{ratio:.3f})")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deco_tiny")
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train", type=int, default=32, help="training images")
    p.add_argument("--val", type=int, default=8, help="validation images")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_synthetic(Path(tmp) / "data", train=args.train, val=args.val, image_size=args.imgsz, seed=0)
        cfg = TrainConfig(
            model=args.model,
            data=str(data),
            imgsz=args.imgsz,
            epochs=args.epochs,
            batch_size=args.batch,
            workers=args.workers,
            threads=args.threads,
            project=str(Path(tmp) / "runs"),
            name="memory",
        )
        rss = measure(cfg)
    print(f"{args.model} at {args.imgsz} px, {args.train} images, batch {args.batch}, {args.workers} workers")
    print(format_table(rss))


if __name__ == "__main__":
    main()
