"""The recipe that reads the data: the training settings a user left unset, chosen from the training
split's statistics and the run's planned length, each logged in one line with its reason.

``decodet train --data D --time-budget-min M`` with no other flag is meant to be the best path a user
can take; every flag still overrides (a choice is made only where the option was not given).  The
choices, for a fresh run (a resumed run keeps its saved, already chosen, config):

* **image size** (the ``light`` recipe, ``--imgsz``): the preset's (320 for ``deco_tiny``), raised, up to
  the images' median long side and at most :data:`MAX_IMGSZ`, when a tenth of the boxes would be under
  :data:`MIN_OBJECT_PX` pixels across; lowered, to at least :data:`MIN_IMGSZ`, while a tenth of the boxes
  stay :data:`SHRINK_OBJECT_PX` or more, on a short run (as for augmentation, below; long runs are not
  measured and keep the preset's size).  A step's cost follows the pixels, and on a short run more steps
  beat more pixels per object: in 5 minutes on a 2-core AVX2 EPYC, the ``fewshot`` set reached AP 0.153 at
  160 px (552 steps) against 0.036 at 320 (198 steps), the bundled set 0.105 against 0.046
  (docs/convergence.md).
* **augmentation strength** (``light``: ``--zoom``, ``--shift``, ``--jitter``): a flip only for a short
  run (a time budget under :data:`AUGMENT_MIN_MINUTES` minutes, or fewer than :data:`AUGMENT_MIN_EPOCHS`
  epochs), where random zoom only slows fitting (the 300-image ``fewshot`` set in 3 minutes: AP 0.104 with
  a flip only, 0.065 with zoom 0.4; the bundled set: 0.504 against 0.384, same steps; docs/convergence.md);
  for a longer run, by the number of training images (fewer images are seen more often and need more).
* **queries** (``--set query_grid``): grown only when a crowded image (the 99th percentile of boxes per
  image) holds more objects than the preset has queries, to :data:`QUERIES_PER_OBJECT` per object; not
  when starting from ``--weights`` (the checkpoint's query layout stays).  Growing it further cost AP:
  the ``small`` set (60 boxes in a crowded image) at 11x11 queries instead of 10x10 reached AP 0.015
  against 0.087 in 3 minutes (docs/convergence.md).
* **the training-time aids stay off**: ``--mosaic`` (Dense O2O tiling) and ``--set one_to_many=K``
  (hybrid matching, DECO+ frame) both cost AP at equal wall-clock on the tuning sets (``fewshot`` with
  mosaic 0.049 against 0.104; ``small`` with one-to-many 0.069 against 0.087: fewer steps in the same
  minutes); so do the auxiliary dense head (``--set dense_aux=K``: ``small`` 0.075 against 0.094, ``photo``
  0.147 against 0.176) and progressive resizing (``--start-imgsz``); they are options to try on long
  runs, not defaults.
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
SHRINK_OBJECT_PX = 12.0  # a smaller square while a tenth of the boxes stay at least this wide (1.5 cells at stride 8)
MIN_IMGSZ = 160  # ... down to this (5x5 cells on the coarsest level, stride 32)
QUERIES_PER_OBJECT = 1.0  # queries per object of a crowded image (its 99th percentile), when it outgrows the preset
AMP_MIN_MINUTES = 2.0  # a run shorter than this (or than AMP_MIN_STEPS) trains in fp32 without timing bf16 ...
AMP_MIN_STEPS = 300  # ... the probe costs about 12 training steps and up to 8 s
AUGMENT_MIN_MINUTES = 30.0  # a shorter time budget (or fewer epochs than AUGMENT_MIN_EPOCHS) augments with a flip only
AUGMENT_MIN_EPOCHS = 30
# (fewer images than this, augmentation) for the light recipe's longer runs: zoom, shift, jitter
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
    queries_line = None
    if "query_grid" not in given.model_overrides and not given.weights:
        grid = choose_query_grid(cfg, stats)
        if grid is not None:
            (qh, qw), preset_q = grid, _preset_queries(cfg)
            overrides = {"query_grid": (qh, qw)}
            if _has_field(cfg, "num_top_queries") and "num_top_queries" not in given.model_overrides:
                overrides["num_top_queries"] = max(qh * qw, int(get_config(cfg.model).num_top_queries))
            changes["model_overrides"] = {**cfg.model_overrides, **overrides}
            queries_line = (
                f"queries {qh * qw} ({qh}x{qw}, preset {preset_q}): crowded images hold {stats.boxes_p99:.0f} boxes "
                f"(99th percentile), {QUERIES_PER_OBJECT:g} queries per object"
            )
    if cfg.transforms == "light":
        if given.imgsz is None:
            step = size_step(_preset_grid(dataclasses.replace(cfg, **changes)))  # the grid chosen above, if any
            changes["imgsz"], why = choose_imgsz(cfg.imgsz, stats, short=short_run(cfg) is not None, step=step)
            lines.append(f"image size {changes['imgsz']}: {why}")
        if given.zoom is None and given.shift is None and given.jitter is None:
            (zoom, shift, jitter), why = augment_for(stats.images, cfg)
            changes.update(zoom=zoom, shift=shift, jitter=jitter)
            what = "a flip only" if not zoom else f"zoom {zoom:g}, shift {shift:g}, colour jitter {jitter:g}"
            lines.append(f"augmentation {what}: {why}")
    if queries_line:
        lines.append(queries_line)
    if given.amp is None:
        changes["amp"], why = choose_amp(cfg, stats)
        lines.append(f"precision {changes['amp']}: {why}")
    if log_choices:
        for line in lines:
            log.info("data recipe: %s", line)
    return dataclasses.replace(cfg, **changes)


def choose_imgsz(preset: int, stats: DataStats, short: bool = True, step: int = 160) -> tuple[int, str]:
    """The training square for the light recipe, and why: raised where a tenth of the boxes would be under
    :data:`MIN_OBJECT_PX` at the preset's size; on a ``short`` run (:func:`short_run`), lowered in multiples of
    ``step`` (:func:`size_step`; at least :data:`MIN_IMGSZ`) while a tenth of them stay
    :data:`SHRINK_OBJECT_PX` or more."""
    small = stats.box_side_p10 * preset / max(stats.long_side, 1.0)
    native = _round_up(stats.long_side, 32)
    if 0 < small < MIN_OBJECT_PX and native > preset:
        size = min(native, MAX_IMGSZ, _round_up(preset * MIN_OBJECT_PX / small, 32))
        return size, (
            f"a tenth of the boxes would be under {small:.1f} px at the preset's {preset}; "
            f"the images' median long side is {stats.long_side:.0f} px"
        )
    if short and small > SHRINK_OBJECT_PX:
        size = max(MIN_IMGSZ, _round_up(preset * SHRINK_OBJECT_PX / small, step))
        if size < preset:
            return size, (
                f"a tenth of the boxes are {small * size / preset:.0f} px or more there ({small:.0f} at the preset's "
                f"{preset}; at least {SHRINK_OBJECT_PX:g} kept): {(size / preset) ** 2:.2f}x the pixels per step"
            )
    if not short and small > SHRINK_OBJECT_PX:
        return preset, f"the preset's on a long run (smaller, to keep {SHRINK_OBJECT_PX:g} px boxes, on short ones)"
    if native < preset:
        return preset, f"the preset's; a tenth of the boxes are under {SHRINK_OBJECT_PX:g} px below it"
    return preset, f"the preset's; a tenth of the boxes are {small:.0f} px or more there"


def short_run(cfg: TrainConfig) -> str | None:
    """Why ``cfg`` (resolved) is a short run (a time budget under :data:`AUGMENT_MIN_MINUTES` minutes, or fewer
    than :data:`AUGMENT_MIN_EPOCHS` epochs without one), or ``None`` for a long one."""
    if cfg.time_budget_min is not None and cfg.time_budget_min < AUGMENT_MIN_MINUTES:
        return f"a {cfg.time_budget_min:g}-minute run (augmenting from {AUGMENT_MIN_MINUTES:g})"
    if cfg.time_budget_min is None and cfg.epochs < AUGMENT_MIN_EPOCHS:
        return f"a run of {cfg.epochs} epochs (augmenting from {AUGMENT_MIN_EPOCHS})"
    return None


def augment_for(images: int, cfg: TrainConfig) -> tuple[tuple[float, float, float], str]:
    """``(zoom, shift, jitter)`` of the light recipe for a training split of ``images`` and the run ``cfg``
    (resolved), and why."""
    why = short_run(cfg)
    if why is not None:
        return (0.0, 0.0, 0.0), why
    for limit, values in AUGMENT_BY_SIZE:
        if images < limit:
            return values, f"{images} training images"
    return AUGMENT_BY_SIZE[-1][1], f"{images} training images"


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


def size_step(grid: Sequence[int]) -> int:
    """The sizes a shrunk square takes: multiples of 32 whose stride-16 map (DECO+'s decoder memory) is a
    whole multiple of the query grid's sides, so that every query pools the same number of memory cells.
    Between them, 224 (for a 10x10 grid) measured worse than both 160 and 320 on two sets (docs/convergence.md)."""
    return math.lcm(32, *(16 * int(g) for g in grid))


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
