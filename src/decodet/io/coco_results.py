"""Detections -> the COCO *results* format: ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``.

The one conversion, used by evaluation (:mod:`decodet.evaluation.evaluator`), ``decodet predict``
(:mod:`decodet.predict.images`) and the benchmarks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from decodet.errors import DecodetError


def detections_to_coco(dets: Mapping[int, Mapping[str, Any]], max_dets: int | None = 100) -> list[dict]:
    """``{image_id: {"boxes": [N, 4] xyxy, "scores": [N], "labels": [N] category ids}}`` -> COCO results
    ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]`` as unrounded Python floats.

    ``max_dets`` keeps the highest-scoring detections per image (``None``: all), in their input order
    (COCOeval breaks score ties by order)."""
    results = []
    for image_id, det in dets.items():
        boxes, scores, labels = det_arrays(det, image_id)
        keep = np.arange(len(scores))
        if max_dets is not None and len(scores) > max_dets:
            keep = np.sort(np.argsort(-scores, kind="stable")[:max_dets])
        xywh = boxes[keep]
        xywh[:, 2:] -= xywh[:, :2]
        iid = int(image_id)
        for box, score, label in zip(xywh.tolist(), scores[keep].tolist(), labels[keep].tolist()):
            results.append({"image_id": iid, "category_id": label, "bbox": box, "score": score})
    return results


def det_arrays(det: Mapping[str, Any], image_id: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> boxes ``[N, 4]`` float64, scores ``[N]`` float64, labels ``[N]`` int64 (fresh copies)."""
    try:
        boxes = _as_numpy(det["boxes"], np.float64)
        scores = _as_numpy(det["scores"], np.float64).reshape(-1)
        labels = _as_numpy(det["labels"], np.int64).reshape(-1)
    except (KeyError, TypeError) as e:
        raise DecodetError(f"detections for image {image_id}: need 'boxes', 'scores' and 'labels' ({e!r})") from None
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or not len(boxes) == len(scores) == len(labels):
        raise DecodetError(
            f"detections for image {image_id}: boxes must be [N, 4] with N scores and labels, got "
            f"{list(boxes.shape)}, {len(scores)}, {len(labels)}"
        )
    return boxes, scores, labels


def _as_numpy(x: Any, dtype: type) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64 if dtype is np.float64 else torch.int64).numpy()
    return np.array(x, dtype=dtype)
