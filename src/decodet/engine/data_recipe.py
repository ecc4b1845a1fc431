"""The recipe that reads the data: the training settings a user left unset, chosen from the training
split's statistics and the run's planned length, each logged in one line with its reason.

``decodet train --data D --time-budget-min M`` with no other flag is meant to be the best path a user
can take; every flag still overrides (a choice is made only where the option was not given).  The
choices, for a fresh run (a resumed run keeps its saved, already chosen, config):

* **image size** (the ``light`` recipe, ``--imgsz``): the preset's (320 for ``deco_tiny``), also for
  smaller images (the bundled 256 px set trained at 320 reached AP 0.195 in 3 minutes, at its own
  256 px 0.022: docs/convergence.md); raised, up to the images' median long side and at most
  :data:`MAX_IMGSZ`, when a tenth of the boxes would be under :data:`MIN_OBJECT_PX` pixels across.
* **augmentation strength** (``light``: ``--zoom``, ``--shift``, ``--jitter``) by the number of
  training images: a short run on a few thousand images sees each image a few times, and random zoom
  then only slows fitting (the bundled 3,000 images: AP 0.504 without zoom, 0.384 with zoom 0.4, same
  steps; docs/benchmarks.md); a few hundred images are seen many times and need it.
* **queries** (``--set query_grid``): at least :data:`QUERIES_PER_OBJECT` per object of a crowded
  image (the 99th percentile of boxes per image), so one-to-one matching has room; only grown, and
  not when starting from ``--weights`` (the checkpoint's query layout stays).
* **denser targets** (``--mosaic``): four samples tiled into one (:mod:`decodet.data.mosaic`) when
  images hold few objects (median at most :data:`MOSAIC_MAX_BOXES`) that stay at least twice
  :data:`MIN_OBJECT_PX` wide at half size; with more objects per image, or small ones, it cost AP.
* **one-to-many matching** (``--set one_to_many``, DECO+ frame): an extra query group matched to the
  targets repeated 4 times, beside the one-to-one matching, for crowded images (median at least
  :data:`O2M_MIN_BOXES` boxes); with fewer objects per image it cost AP.
* **precision** (``--amp``): ``auto`` (bf16 where this machine trains faster in it, timed at the start:
  :mod:`decodet.engine.amp_probe`) for a run long enough to pay for the timing; fp32 otherwise.

The lr and EMA warm-ups and the EMA decay are sized to the planned steps in :mod:`decodet.engine.run_plan`
(and re-sized by a time budget's plan); a time budget also fits the schedule to itself (``fit_schedule``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from decodet.data.coco import ImageRecord
from decodet.engine.train_config import TrainConfig
from decodet.registry import get_config

log = logging.getLogger(__name__)

MIN_OBJECT_PX = 8.0  # a tenth of the boxes at least this wide (square root of the area) at the training size
MAX_IMGSZ = 640  # the largest square the recipe picks by itself (CPU-sized runs)
QUERIES_PER_OBJECT = 2.0  # queries per object of a crowded image (its 99th percentile)
# Measured at equal wall-clock on the tuning sets (docs/convergence.md; the held-out set not consulted):
# mosaic helped the set with a median of 3 boxes per image, cost AP at 6 and 40; one-to-many matching helped
# at 40, cost AP at 3 and 6 (each threshold sits between the sets it separates).
MOSAIC_MAX_BOXES = 4
MOSAIC_PROB = 0.5
O2M_MIN_BOXES = 15
O2M_REPEATS = 4
AMP_MIN_MINUTES = 2.0  # a run shorter than this (or than AMP_MIN_STEPS) trains in fp32 without timing bf16 ...
AMP_MIN_STEPS = 300  # ... the probe costs about 12 training steps and up to 8 s
# (fewer images than this, augmentation) for the light recipe: zoom, shift, jitter
AUGMENT_BY_SIZE: tuple[tuple[int, tuple[float, float, float]], ...] = (
    (500, (0.4, 0.1, 0.2)),
    (2000, (0.2, 0.05, 0.1)),
    (math.inf, (0.0, 0.0, 0.0)),  # type: ignore[arg-type]
)


@dataclass(frozen=True)
class DataStats:
    """What the recipe reads of a training split (sizes in the annotated images' pixels)."""

    images: int
    long_side: float  # median over images of max(width, height)
    boxes_median: float  # boxes per image
    boxes_p99: float
    box_side_p10: float  # square root of the box area, 10th percentile over boxes (0: no boxes)
    box_side_median: float

    @classmethod
    def of(cls, records: Sequence[ImageRecord]) -> DataStats:
        counts = np.array([len(r.boxes) for r in records], dtype=np.float64)
        sides = np.array([max(r.width, r.height) for r in records], dtype=np.float64)
        boxes = [r.boxes for r in records if len(r.boxes)]
        if boxes:
            b = np.concatenate(boxes).astype(np.float64)
            box_sides = np.sqrt(np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None))
        else:
            box_sides = np.zeros(1)
        return cls(
            images=len(records),
            long_side=float(np.median(sides)) if len(sides) else 0.0,
            boxes_median=float(np.median(counts)) if len(counts) else 0.0,
            boxes_p99=float(np.percentile(counts, 99)) if len(counts) else 0.0,
            box_side_p10=float(np.percentile(box_sides, 10)),
            box_side_median=float(np.median(box_sides)),
        )


def apply_data_recipe(given: TrainConfig, cfg: TrainConfig, stats: DataStats, log_choices: bool = True) -> TrainConfig:
    """``cfg`` (resolved) with the unset options of ``given`` chosen from ``stats`` (module docstring); one
    log line per choice with its reason (``log_choices``: on rank 0)."""
    changes: dict[str, Any] = {}
    lines: list[str] = []
    if cfg.transforms == "light":
        if given.imgsz is None:
            changes["imgsz"], why = choose_imgsz(cfg.imgsz, stats)
            lines.append(f"image size {changes['imgsz']}: {why}")
        if given.zoom is None and given.shift is None and given.jitter is None:
            zoom, shift, jitter = augment_for(stats.images)
            changes.update(zoom=zoom, shift=shift, jitter=jitter)
            what = "a flip only" if not zoom else f"zoom {zoom:g}, shift {shift:g}, colour jitter {jitter:g}"
            lines.append(f"augmentation {what}: {stats.images} training images")
    if "query_grid" not in given.model_overrides and not given.weights:
        grid = choose_query_grid(cfg, stats)
        if grid is not None:
            (qh, qw), preset_q = grid, _preset_queries(cfg)
            overrides = {"query_grid": (qh, qw)}
            if _has_field(cfg, "num_top_queries") and "num_top_queries" not in given.model_overrides:
                overrides["num_top_queries"] = max(qh * qw, int(get_config(cfg.model).num_top_queries))
            changes["model_overrides"] = {**cfg.model_overrides, **overrides}
            lines.append(
                f"queries {qh * qw} ({qh}x{qw}, preset {preset_q}): crowded images hold {stats.boxes_p99:.0f} boxes "
                f"(99th percentile), {QUERIES_PER_OBJECT:g} queries per object"
            )
    size = changes.get("imgsz", cfg.imgsz)
    if given.mosaic is None:
        changes["mosaic"], why = choose_mosaic(stats, size)
        lines.append(f"mosaic {changes['mosaic']:g}: {why}")
    if _has_field(cfg, "one_to_many") and "one_to_many" not in given.model_overrides:
        repeats, why = choose_one_to_many(stats)
        overrides = {**changes.get("model_overrides", cfg.model_overrides), "one_to_many": repeats}
        changes["model_overrides"] = overrides
        lines.append(f"one-to-many matching {'x' + str(repeats) if repeats else 'off'}: {why}")
    if given.amp is None:
        changes["amp"], why = choose_amp(cfg, stats)
        lines.append(f"precision {changes['amp']}: {why}")
    if log_choices:
        for line in lines:
            log.info("data recipe: %s", line)
    return dataclasses.replace(cfg, **changes)


def choose_imgsz(preset: int, stats: DataStats) -> tuple[int, str]:
    """The training square for the light recipe, and why."""
    small = stats.box_side_p10 * preset / max(stats.long_side, 1.0)
    native = _round_up(stats.long_side, 32)
    if 0 < small < MIN_OBJECT_PX and native > preset:
        size = min(native, MAX_IMGSZ, _round_up(preset * MIN_OBJECT_PX / small, 32))
        return size, (
            f"a tenth of the boxes would be under {small:.1f} px at the preset's {preset}; "
            f"the images' median long side is {stats.long_side:.0f} px"
        )
    if native < preset:  # measured: the bundled 256 px set at 320 reached AP 0.195 where 256 reached 0.022
        return preset, f"the preset's, above the images' median long side of {stats.long_side:.0f} px (measured better)"
    return preset, f"the preset's; a tenth of the boxes are {small:.0f} px or more there"


def augment_for(images: int) -> tuple[float, float, float]:
    """``(zoom, shift, jitter)`` of the light recipe for a training split of ``images``."""
    for limit, values in AUGMENT_BY_SIZE:
        if images < limit:
            return values
    return AUGMENT_BY_SIZE[-1][1]


def choose_query_grid(cfg: TrainConfig, stats: DataStats) -> tuple[int, int] | None:
    """A larger query grid when crowded images would leave fewer than :data:`QUERIES_PER_OBJECT` queries per
    object, keeping the preset grid's aspect; ``None`` when the preset's is enough."""
    qh, qw = _preset_grid(cfg)
    need = math.ceil(QUERIES_PER_OBJECT * stats.boxes_p99)
    if need <= qh * qw:
        return None
    scale = math.sqrt(need / (qh * qw))
    h = math.ceil(qh * scale)
    return h, math.ceil(need / h)


def choose_mosaic(stats: DataStats, imgsz: int | None) -> tuple[float, str]:
    """The probability of a tiled sample, and why."""
    median = f"a median of {stats.boxes_median:g} boxes per image"
    if stats.boxes_median > MOSAIC_MAX_BOXES:
        return 0.0, f"{median} (tiling helps at {MOSAIC_MAX_BOXES} or fewer)"
    half = stats.box_side_p10 * (imgsz or stats.long_side) / max(stats.long_side, 1.0) / 2
    if half < 2 * MIN_OBJECT_PX:
        return 0.0, f"{median}, but a tenth of the boxes would be under {half:.0f} px at half size"
    return MOSAIC_PROB, f"{median}: four samples tiled give one-to-one matching more objects per step"


def choose_one_to_many(stats: DataStats) -> tuple[int, str]:
    """The one-to-many repeats (0: off), and why."""
    median = f"a median of {stats.boxes_median:g} boxes per image"
    if stats.boxes_median >= O2M_MIN_BOXES:
        return O2M_REPEATS, f"{median}: crowded images"
    return 0, f"{median} (on from {O2M_MIN_BOXES})"


def choose_amp(cfg: TrainConfig, stats: DataStats) -> tuple[str, str]:
    """``auto`` for a run long enough to time bf16 against fp32, else ``none``; and why."""
    if cfg.device.startswith("cuda"):
        return "auto", "on CUDA (bf16 where the GPU supports it)"
    if cfg.time_budget_min is not None:
        if cfg.time_budget_min >= AMP_MIN_MINUTES:
            return "auto", f"a {cfg.time_budget_min:g}-minute run: bf16 and fp32 are timed at the start"
        return "none", f"a {cfg.time_budget_min:g}-minute run is too short to time bf16 against fp32"
    steps = cfg.epochs * math.ceil(stats.images / cfg.batch_size / cfg.accumulate)
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    if steps >= AMP_MIN_STEPS:
        return "auto", f"a run of {steps} steps: bf16 and fp32 are timed at the start"
    return "none", f"a run of {steps} steps is too short to time bf16 against fp32"


def _preset_grid(cfg: TrainConfig) -> tuple[int, int]:
    grid = cfg.model_overrides.get("query_grid") or get_config(cfg.model).query_grid
    return int(grid[0]), int(grid[1])


def _preset_queries(cfg: TrainConfig) -> int:
    qh, qw = _preset_grid(cfg)
    return qh * qw


def _has_field(cfg: TrainConfig, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(get_config(cfg.model)))


def _round_up(x: float, m: int) -> int:
    return int(math.ceil(x / m) * m)
