"""COCO AP of a deployed model: a :class:`~decodet.deploy.detector.Detector` on any backend and precision.

``decodet eval --backend B --precision P`` comes here (via
:func:`~decodet.engine.evaluate.evaluate_checkpoint`): the images of the split are read from
their files, resized to the Detector's fixed size, run through ``Detector.predict_batch``
(torch eager / compiled, bf16, int8, ONNX Runtime, OpenVINO, an exported ``.onnx`` / ``.xml``)
and the boxes, already in original-image pixels, are scored with pycocotools by
:class:`~decodet.engine.evaluator.CocoEvaluator`.  One process (no sharding).

For presets evaluated with a square resize (``light``, ``rtdetr`` recipes) the fp32 torch
run equals the default ``decodet eval`` up to float rounding; DECO's keep-aspect ``detr``
evaluation differs (the Detector resizes to its fixed deploy size), so compare precisions
and backends with each other through this path.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from decodet.data.coco import CocoDetection
from decodet.engine.evaluator import CocoEvaluator
from decodet.errors import DecodetError
from decodet.io.atomic import atomic_write_text
from decodet.io.coco_results import detections_to_coco
from decodet.utils.console import progress

log = logging.getLogger(__name__)


def evaluate_detector(
    detector: Any,
    images_dir: str | os.PathLike,
    ann_file: str | os.PathLike,
    batch_size: int = 4,
    out: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """The 12 COCO stats of ``detector`` (a ``Detector``) on the images of ``ann_file``.

    With ``out``, writes ``detections.json`` and ``stats.json`` into that folder.
    """
    dataset = CocoDetection(images_dir, ann_file)  # validates the JSON; images read by path below
    entries = [(int(rec.id), dataset.image_path(n)) for n, rec in enumerate(dataset.records)]
    evaluator = CocoEvaluator(max_dets=detector.max_det)
    kept: dict[int, dict[str, torch.Tensor]] = {}
    step = max(1, int(batch_size))
    chunks = [entries[i : i + step] for i in range(0, len(entries), step)]
    for chunk in progress(chunks, desc="eval", disable=None if show_progress else True, log_every=0):
        results = list(detector.stream([str(p) for _, p in chunk], batch_size=step))
        dets = [{k: r[k] for k in ("boxes", "scores", "labels")} for r in results]
        ids = [i for i, _ in chunk]
        evaluator.update(ids, dets)
        if out is not None:
            kept.update(zip(ids, dets))
    stats = evaluator.summarize(ann_file)
    if out is not None:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "detections.json", json.dumps(detections_to_coco(kept, max_dets=None)))
        atomic_write_text(out_dir / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats


def evaluate_deployed(
    weights: Any,
    data: str | os.PathLike,
    split: str = "val",
    imgsz: int | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    out: str | os.PathLike | None = None,
    backend: str | None = None,
    precision: str | None = None,
    calib: Any = None,
    compile: bool = False,
) -> dict[str, float]:
    """COCO stats of ``weights`` (checkpoint, ``.onnx`` or ``.xml``) on a split, run by a
    ``Detector(weights, backend=..., precision=...)`` with score threshold 0 and 100 detections.

    int8 without ``calib`` calibrates on (up to 32 images of) the dataset's ``train`` split
    when it has one: real images of the domain, never the split being evaluated.
    """
    from decodet.data.spec import resolve_data
    from decodet.deploy.detector import Detector

    spec = resolve_data(data)
    if precision == "int8" and calib is None:
        try:
            calib = spec.split("train").images_dir
            log.info("calibrating int8 on the training images in %s", calib)
        except DecodetError:  # no train split: Detector warns about synthetic calibration
            calib = None
    detector = Detector(
        weights,
        device=("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device,
        backend=backend,
        imgsz=imgsz,
        score_threshold=0.0,
        max_det=100,
        batch_size=batch_size,
        precision=precision,
        calib=calib,
        compile=compile,
    )
    log.info("evaluating %r", detector)
    split_spec = spec.split(split)
    return evaluate_detector(detector, split_spec.images_dir, split_spec.ann_file, batch_size, out)
