"""Run logging: metrics files (JSONL + CSV) and loss / mAP plots.

Progress bars and the ``decodet`` logger are in :mod:`decodet.utils.console` (inference uses them too).

A run directory holds ``metrics.jsonl`` (one JSON object per line, the source of truth),
``metrics.csv`` (the same records as a table) and, after ``plot_curves``, ``loss.png`` and
``map.png``. Key names the plots look for (nested dicts are flattened with ``/``):

    step, epoch                     x axes (log both in every record)
    train_loss (or loss)            training loss, per step or per epoch
    val_loss                        validation loss
    AP, AP50 (or val/AP, val/AP50)  COCO stats of an evaluated epoch
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from decodet.errors import DecodetError
from decodet.io.atomic import atomic_path

logger = logging.getLogger(__name__)

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
TRAIN_LOSS_KEYS = ("train_loss", "train/loss", "loss")
VAL_LOSS_KEYS = ("val_loss", "val/loss")
AP_KEYS = ("AP", "val/AP", "coco/AP")
AP50_KEYS = ("AP50", "val/AP50", "coco/AP50")


class MetricsLogger:
    """Appends metric records to ``run_dir/metrics.jsonl`` and ``run_dir/metrics.csv``.

    Each record is written with one ``write`` then flushed and fsynced, so a crash loses at most
    the record being written; a torn last line left by a power cut is dropped on the next open.
    CSV columns are the union of all keys in first-seen order: when a record brings a new key,
    the CSV is rebuilt from the JSONL (temp file + rename), otherwise one row is appended.
    Opening an existing run directory (resume) continues both files. Use on rank 0 only.

    >>> metrics = MetricsLogger("runs/exp1")
    >>> metrics.log(epoch=0, step=500, train_loss=12.3, lr=1e-4)
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / METRICS_JSONL
        self.csv_path = self.run_dir / METRICS_CSV
        _drop_torn_tail(self.jsonl_path)
        self.columns: list[str] = []
        if self.jsonl_path.exists():
            self._rebuild_csv(read_metrics(self.run_dir))

    def log(self, record: Mapping[str, Any] | None = None, **values: Any) -> dict[str, Any]:
        """Append ``record`` merged with ``values`` (a ``time`` stamp is added); returns what was written."""
        row = _flatten({**(record or {}), **values})
        row.setdefault("time", round(time.time(), 3))
        with open(self.jsonl_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            _flush(f)
        if any(key not in self.columns for key in row):
            self._rebuild_csv(read_metrics(self.run_dir))
        else:
            with open(self.csv_path, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, self.columns, restval="").writerow(row)
                _flush(f)
        return row

    def drop_after(self, key: str, value: float) -> int:
        """Forget records whose ``key`` is greater than ``value`` (resuming from an earlier
        checkpoint); returns how many were dropped. Both files are rewritten atomically."""
        records = read_metrics(self.run_dir) if self.jsonl_path.exists() else []
        kept = [r for r in records if not (isinstance(r.get(key), (int, float)) and r[key] > value)]
        if len(kept) != len(records):
            with atomic_path(self.jsonl_path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            self._rebuild_csv(kept)
        return len(records) - len(kept)

    def _rebuild_csv(self, records: Sequence[Mapping[str, Any]]) -> None:
        self.columns = list(dict.fromkeys(key for r in records for key in r))
        with atomic_path(self.csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, self.columns, restval="")
            writer.writeheader()
            writer.writerows(records)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (a torn last line is skipped with a warning)."""
    path = Path(run_dir) / METRICS_JSONL
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DecodetError("file not found (no metrics were logged in this run directory)", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DecodetError(f"cannot read ({e})", path) from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                logger.warning("%s: skipping the incomplete last line", path)
                continue
            raise DecodetError(f"line {number} is not valid JSON", path) from None
        if not isinstance(record, dict):
            raise DecodetError(f"line {number} is not a JSON object", path)
        records.append(record)
    return records


def plot_curves(run_dir: str | os.PathLike) -> list[Path]:
    """Write ``loss.png`` (train / val loss) and ``map.png`` (AP, AP50) from ``metrics.jsonl``.

    A figure whose series are all absent is skipped. The x axis is ``step`` when every plotted
    record has one, else ``epoch`` (``map.png`` prefers ``epoch``), else the record number.
    Returns the paths written (each atomically).
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    figures = [
        ("loss.png", "loss", [("train loss", TRAIN_LOSS_KEYS), ("val loss", VAL_LOSS_KEYS)], ("step", "epoch")),
        ("map.png", "COCO AP", [("AP", AP_KEYS), ("AP50", AP50_KEYS)], ("epoch", "step")),
    ]
    written = []
    for name, ylabel, series_keys, x_keys in figures:
        series = []
        for label, candidates in series_keys:
            key = next((k for k in candidates if any(_is_number(r.get(k)) for r in records)), None)
            if key is not None:
                series.append((label, [r for r in records if _is_number(r.get(key))], key))
        if not series:
            continue
        plotted = [r for _, rows, _ in series for r in rows]
        x_key = next((k for k in x_keys if all(_is_number(r.get(k)) for r in plotted)), None)
        path = run_dir / name
        _save_plot(path, series, x_key, ylabel, nonnegative=name == "map.png")
        written.append(path)
    return written


def _save_plot(path: Path, series: list, x_key: str | None, ylabel: str, nonnegative: bool) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)  # render with Agg; no pyplot, no global backend switch
    ax = fig.add_subplot()
    for label, rows, key in series:
        if nonnegative:  # COCOeval reports -1 for "no ground truth in this subset"
            rows = [r for r in rows if r[key] >= 0]
        xs = [r[x_key] if x_key else i for i, r in enumerate(rows)]
        ax.plot(xs, [r[key] for r in rows], label=label, marker="o" if len(rows) <= 50 else None, markersize=3)
    ax.set_xlabel(x_key or "record")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"val/AP": ...}``; tensors and numpy scalars -> Python numbers."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}/"))
            continue
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
            value = value.item()  # torch / numpy scalars
        if not isinstance(value, (str, int, float, bool, type(None))):
            value = str(value)
        flat[name] = value
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _flush(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that lacks its newline (a write interrupted by a power cut)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    logger.warning("%s: dropping an incomplete last record (%d bytes)", path, len(data) - keep)
    with open(path, "r+b") as f:
        f.truncate(keep)
        _flush(f)


def log_run_start(cfg: Any, num_classes: int, n_params: int, device: Any, world_size: int, n_train: int,
                  n_val: int | None, run_dir: Path, steps_per_epoch: int) -> None:  # fmt: skip
    """The two lines a training run starts with: what trains on what, and its recipe."""
    log = logging.getLogger("decodet.engine.trainer")  # the trainer's lines, under the trainer's name
    log.info(
        "training %s (%.2fM trainable parameters, %d classes) on %s x%d | %d train images%s | run folder %s",
        cfg.model, n_params / 1e6, num_classes, device, world_size, n_train,
        f", {n_val} val images" if n_val is not None else "", run_dir,
    )  # fmt: skip
    log.info(
        "recipe: lr %g (backbone %g%s), wd %g, %s schedule, warm-up %d, %d steps/epoch, ema %s, amp %s, "
        "transforms %s at %d%s",
        cfg.lr, cfg.lr_backbone, f", encoder {cfg.lr_encoder:g}" if cfg.lr_encoder is not None else "",
        cfg.weight_decay, cfg.schedule, cfg.warmup_steps, steps_per_epoch, "on" if cfg.ema else "off", cfg.amp,
        cfg.transforms, cfg.imgsz, " multi-scale" if cfg.multiscale else "",
    )  # fmt: skip
