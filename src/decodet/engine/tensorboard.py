"""TensorBoard logging for ``decodet train --tensorboard`` (rank 0 only).

Event files go to ``<run folder>/tensorboard`` (``tensorboard --logdir runs``). Scalars, with the
optimizer step as x axis:

    step/loss            the training loss of every optimizer step
    train/<term>         per-epoch means of the loss terms (train/loss, train/loss_ce, ...)
    lr/<group>           learning rate of each parameter group at the epoch's end
    val/<stat>           the 12 COCO stats of each evaluation (val/AP, val/AP50, ...)
    speed/images_per_s, speed/epoch_time

and after each evaluation ``val_images/<file name>``: a few validation images with the model's
detections drawn (:func:`decodet.inference.draw.draw_detections`).

``tensorboard`` is an optional dependency (``pip install 'decodet[tensorboard]'``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from decodet.errors import DecodetError

log = logging.getLogger(__name__)

TB_DIR = "tensorboard"
NUM_IMAGES = 4
IMAGE_SCORE_THRESHOLD = 0.3


def require_tensorboard() -> None:
    """A one-line :class:`DecodetError` when the optional ``tensorboard`` package is missing."""
    try:
        import torch.utils.tensorboard  # noqa: F401  (imports tensorboard, checks its version)
    except ImportError:
        raise DecodetError(
            "--tensorboard needs the tensorboard package: pip install 'decodet[tensorboard]' (or tensorboard)"
        ) from None


class TensorBoardLogger:
    """Writes a training run's scalars and validation images as TensorBoard event files.

    >>> tb = TensorBoardLogger("runs/exp")  # -> runs/exp/tensorboard/events.out.tfevents.*
    >>> tb.log_record({"step": 100, "train/loss": 3.2, "val/AP": 0.1})
    >>> tb.close()
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / TB_DIR
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_step(self, step: int, loss: float) -> None:
        """The loss of one optimizer step."""
        self.writer.add_scalar("step/loss", loss, step)

    def log_record(self, record: Mapping[str, Any]) -> None:
        """An epoch record of the trainer (``step``, ``train/*``, ``lr/*``, ``val/*``, ...): every
        finite number under its own tag (``images_per_s`` and ``epoch_time`` under ``speed/``)."""
        step = int(record["step"])
        for key, value in record.items():
            if key in ("step", "epoch", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(key if "/" in key else f"speed/{key}", value, step)
        self.writer.flush()

    @torch.no_grad()
    def log_images(
        self,
        model: nn.Module,
        dataset: Any,
        step: int,
        device: torch.device | str = "cpu",
        imgsz: int | None = None,
        num: int = NUM_IMAGES,
    ) -> None:
        """Draw ``model``'s detections (score >= 0.3) on the first ``num`` images of ``dataset``
        (a ``CocoDetection``: ``load_image(i)``, ``image_path(i)``); ``model`` is not changed."""
        from decodet.inference.draw import draw_detections
        from decodet.runtime.detector import Detector

        count = min(num, len(dataset))
        if count == 0:
            return
        detector = Detector(model, device=device, imgsz=imgsz, score_threshold=IMAGE_SCORE_THRESHOLD)
        for i in range(count):
            try:
                image = dataset.load_image(i)
            except (OSError, DecodetError) as e:
                log.warning("tensorboard: cannot read validation image %d (%s)", i, e)
                continue
            result = detector(image)[0]
            drawn = draw_detections(image, result, detector.class_names, IMAGE_SCORE_THRESHOLD)
            tag = f"val_images/{Path(dataset.image_path(i)).name}"
            self.writer.add_image(tag, np.asarray(drawn), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
