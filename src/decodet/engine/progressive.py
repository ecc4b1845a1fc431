"""Progressive resizing: the first part of a run trains on smaller images, the rest at the run's size.

A step's cost follows the pixels, and early in a run the model learns coarse things that small images
teach as well: at 160 px a 2-core CPU fits 1.8x the steps of 256 px.  Later, small objects need the
pixels.  With ``TrainConfig.start_imgsz`` the batches of the first ``start_fraction`` of the run (of its
time budget when it has one, else of its planned steps) are resized to ``start_imgsz`` (bilinear,
antialiased; boxes are normalised, so they stay); then the loader's own ``imgsz`` batches are used as they
are.  Evaluation, the checkpoint, prediction and export use ``imgsz``: the model ends at that size (the
evaluations between epochs start after the switch: before it, the model scores about 0 at ``imgsz``).  The
time-budget planner re-times the steps as they run, so the slower steps after the switch shorten the
planned schedule without a jump in the rate (:mod:`decodet.engine.budget`).
"""

from __future__ import annotations

import logging

import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)


class ProgressiveSize:
    """When a run's batches are resized (module docstring).  ``start``: the early side (``None``: never
    resized); ``fraction``: the share of the run at that side; ``final``: the run's ``imgsz``."""

    def __init__(self, start: int | None, fraction: float, final: int, announce: bool = True) -> None:
        self.start, self.fraction, self.final = start, fraction, final
        self.done = start is None
        self.announce = announce
        if start is not None and announce:
            log.info("progressive resizing: batches at %d px for the first %.0f%% of the run, then %d px",
                     start, 100 * fraction, final)  # fmt: skip

    def side(self, trained_s: float, budget_s: float | None, step: int, total_steps: int) -> int | None:
        """The side to resize the next batch to, or ``None`` (the loader's size).  ``trained_s`` of
        ``budget_s`` training seconds (``None``: no time budget: ``step`` of ``total_steps`` decides)."""
        if self.done:
            return None
        progress = trained_s / budget_s if budget_s else step / max(total_steps, 1)
        if progress < self.fraction:
            return self.start
        self.done = True
        if self.announce:
            log.info("progressive resizing: %d px from step %d on", self.final, step)
        return None


def resize_batch(images: Tensor, side: int) -> Tensor:
    """``images [B, 3, H, W]`` -> ``[B, 3, side, side]``, bilinear with antialiasing (for shrinking)."""
    if images.shape[-2:] == (side, side):
        return images
    return F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
