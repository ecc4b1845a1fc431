"""COCO AP of a deployed model: a :class:`~decodet.runtime.detector.Detector` on any backend and
precision, or any *runner* (:class:`RunnerEvaluator`: the AP column of ``decodet benchmark``, the
AP ranking of the int8 sweep); ``decodet eval --backend B --precision P`` comes here, one process.

A runner is what every backend offers (``Detector.predict_batch``, ``DeployModel``, a wrapped ONNX
session): ``run(images [B, 3, H, W] preprocessed, orig_sizes [B, 2]) -> (boxes [B, K, 4] xyxy
original pixels, scores [B, K], labels [B, K] category ids)``.  Images are preprocessed as
``Detector`` does (one fixed size), so every backend is scored on the same inputs.  For square-
resize presets (``light``, ``rtdetr`` recipes) fp32 torch equals the default ``decodet eval`` up to
rounding; DECO's keep-aspect ``detr`` evaluation differs, so compare precisions and backends with
each other through this path.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from decodet.data.images import load_image
from decodet.data.spec import resolve_data
from decodet.errors import DecodetError
from decodet.evaluation.evaluator import evaluate_coco
from decodet.inference.calibration import calibration_source
from decodet.inference.inputs import preprocess
from decodet.io.atomic import atomic_write_text
from decodet.io.coco_results import detections_to_coco
from decodet.io.files import read_json
from decodet.runtime.detector import Detector, pad_batch
from decodet.runtime.options import RunOptions

log = logging.getLogger(__name__)


Runner = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


class RunnerEvaluator:
    """``evaluator(run, imgsz, mean, std) -> COCO stats`` on one split of a dataset.

    Args:
        data: a dataset folder or ``data.yaml`` (:func:`decodet.data.spec.resolve_data`).
        split: which split's images and ground truth (default ``val``).
        limit: score only the first ``limit`` images of the split (``None``: all).
        batch_size: images per runner call (the last call is padded to it with copies, :func:`pad_batch`).

    After a call, ``detections`` holds the last run's ``{image_id: boxes / scores / labels}``.
    """

    def __init__(
        self, data: str | os.PathLike, split: str = "val", limit: int | None = None, batch_size: int = 8
    ) -> None:
        split_spec = resolve_data(data).split(split)
        self.ann_file = Path(split_spec.ann_file)
        gt = read_json(self.ann_file)
        images = list(gt.get("images", []))
        if limit is not None:
            images = images[: max(1, int(limit))]
        if not images:
            raise DecodetError(f"split {split!r} has no images", self.ann_file)
        self.images = [(int(im["id"]), Path(split_spec.images_dir) / im["file_name"]) for im in images]
        self.batch_size = max(1, int(batch_size))
        self.detections: dict[int, dict[str, Tensor]] = {}

    def __call__(
        self, run: Runner, imgsz: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]
    ) -> dict[str, float]:
        dets: dict[int, dict[str, Tensor]] = {}
        for start in range(0, len(self.images), self.batch_size):
            chunk = self.images[start : start + self.batch_size]
            tensors, sizes = zip(*(preprocess(load_image(path), imgsz, mean, std) for _, path in chunk))
            x, s = pad_batch(torch.stack(tensors), torch.tensor(sizes, dtype=torch.float32), self.batch_size)
            boxes, scores, labels = run(x, s)
            for i, (image_id, _) in enumerate(chunk):
                dets[image_id] = {"boxes": boxes[i].float(), "scores": scores[i].float(), "labels": labels[i].long()}
        self.detections = dets
        return evaluate_coco(self.ann_file, dets, image_ids=[i for i, _ in self.images])


def evaluate_detector(
    detector: Any,
    data: str | os.PathLike,
    split: str = "val",
    batch_size: int = 4,
    out: str | os.PathLike | None = None,
) -> dict[str, float]:
    """The 12 COCO stats of ``detector`` (a ``Detector``) on a split; with ``out``, also writes
    ``detections.json`` and ``stats.json`` into that folder."""
    evaluator = RunnerEvaluator(data, split, batch_size=batch_size)
    stats = evaluator(detector.predict_batch, detector.imgsz, detector.mean, detector.std)
    if out is not None:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        detections = detections_to_coco(evaluator.detections, max_dets=None)
        atomic_write_text(out_dir / "detections.json", json.dumps(detections))
        atomic_write_text(out_dir / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats


def evaluate_deployed(
    weights: Any,
    data: str | os.PathLike,
    split: str = "val",
    options: RunOptions | None = None,
    out: str | os.PathLike | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """COCO stats of ``weights`` (checkpoint, ``.onnx`` or ``.xml``) on a split, run by a
    ``Detector(weights, options=...)`` (``kwargs``: :class:`RunOptions` fields replacing
    ``options``') with score threshold 0 and 100 detections.  int8 without ``calib_images``
    calibrates on the dataset's ``train`` split when it has one
    (:func:`~decodet.inference.calibration.calibration_source`)."""
    o = RunOptions.build(options, **kwargs)
    calib = calibration_source(o.calib_images, data) if o.precision == "int8" else o.calib_images
    detector = Detector(weights, options=replace(o, score_threshold=0.0, max_det=100, calib_images=calib))
    log.info("evaluating %r", detector)
    return evaluate_detector(detector, data, split, o.batch_size, out)
