"""COCO box evaluation: detections + COCO ground truth -> the 12 standard stats.

The numbers come from pycocotools' ``COCOeval``, run quietly; this module validates inputs, converts detection
formats and collects detections across processes.  (faster-coco-eval 1.8 differs from pycocotools in the last
bits of some stats, so it is not offered.)

Detections: a COCO results list (``image_id``, ``category_id``, ``bbox`` xywh, ``score``), a path to a JSON file
of one, or ``{image_id: {"boxes": [N, 4] xyxy, "scores", "labels"}}`` with category ids as labels (what
``postprocess(..., category_ids=...)`` returns)."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from decodet.errors import DecodetError
from decodet.io.coco_results import det_arrays, detections_to_coco
from decodet.io.files import read_json

logger = logging.getLogger(__name__)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# (metric, IoU range, area range, max detections) for each of the 12 stats, in COCOeval's order.
_STAT_ROWS = [
    ("Average Precision  (AP)", "0.50:0.95", "all", 100),
    ("Average Precision  (AP)", "0.50", "all", 100),
    ("Average Precision  (AP)", "0.75", "all", 100),
    ("Average Precision  (AP)", "0.50:0.95", "small", 100),
    ("Average Precision  (AP)", "0.50:0.95", "medium", 100),
    ("Average Precision  (AP)", "0.50:0.95", "large", 100),
    ("Average Recall     (AR)", "0.50:0.95", "all", 1),
    ("Average Recall     (AR)", "0.50:0.95", "all", 10),
    ("Average Recall     (AR)", "0.50:0.95", "all", 100),
    ("Average Recall     (AR)", "0.50:0.95", "small", 100),
    ("Average Recall     (AR)", "0.50:0.95", "medium", 100),
    ("Average Recall     (AR)", "0.50:0.95", "large", 100),
]

GroundTruth = Any  # path, loaded dict, or pycocotools.coco.COCO
Detections = Any  # results list, path to one, or {image_id: {"boxes", "scores", "labels"}}


def evaluate_coco(
    gt_json: GroundTruth,
    detections: Detections,
    *,
    iou_type: str = "bbox",
    image_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """The 12 COCO stats (``AP``, ``AP50``, ... ``ARl``, floats in [0, 1]) of ``detections`` against
    ``gt_json`` (a COCO instances JSON path, its dict, or a ``COCO``).  ``detections`` may hold tensors or arrays.

    The dict form of ``detections`` is not truncated here (the detector's top-k decides).  ``image_ids``:
    evaluate on these only (default: all of the ground truth); listed images without detections count as
    misses.  As in pycocotools, -1.0 means the (sub)set has no ground truth (e.g. ``APs`` with no small
    object).  :class:`DecodetError`: unreadable or malformed files, detections for unknown images or ``image_ids``."""
    ev = run_coco_eval(gt_json, detections, iou_type=iou_type, image_ids=image_ids)
    return {name: float(value) for name, value in zip(STAT_NAMES, ev.stats)}


def run_coco_eval(
    gt_json: GroundTruth,
    detections: Detections,
    *,
    iou_type: str = "bbox",
    image_ids: Iterable[int] | None = None,
) -> Any:
    """As :func:`evaluate_coco`, but returns the summarised ``COCOeval`` itself: ``eval["precision"]``
    (``[T, R, K, A, M]``) and ``eval["recall"]`` (``[T, K, A, M]``) feed :mod:`decodet.evaluation.analysis`."""
    if iou_type != "bbox":
        raise DecodetError(f"iou_type must be 'bbox', got {iou_type!r}")
    gt = load_coco_gt(gt_json)
    results, source, declared_ids = _load_results(detections)
    gt_ids = set(gt.getImgIds())
    _check_image_ids(declared_ids | {r["image_id"] for r in results}, gt_ids, source, "detections for")
    if image_ids is None:
        eval_ids = sorted(gt_ids)
    else:
        eval_ids = sorted({int(i) for i in image_ids})
        _check_image_ids(set(eval_ids), gt_ids, None, "image_ids has")
        if not eval_ids:
            raise DecodetError("image_ids is empty: nothing to evaluate")
    _warn_unknown_categories(results, set(gt.getCatIds()), source)
    return _run_pycocotools(gt, results, eval_ids)


def format_stats(stats: Mapping[str, float]) -> str:
    """The 12 stats as COCOeval's familiar 12-line summary."""
    lines = []
    for name, (metric, iou, area, max_dets) in zip(STAT_NAMES, _STAT_ROWS):
        lines.append(f" {metric} @[ IoU={iou:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] = {stats[name]:0.3f}")
    return "\n".join(lines)


class CocoEvaluator:
    """Collects detections during an evaluation pass, across processes, then scores them.

    >>> ev = CocoEvaluator()
    >>> for images, targets in loader:  # every rank
    ...     ev.update([t["image_id"] for t in targets], postprocess(model(images), sizes, category_ids=ids))
    >>> ev.gather()  # every rank (collective when torch.distributed is initialised)
    >>> stats = ev.summarize(gt_json) if rank == 0 else None

    An image seen twice (``DistributedSampler`` pads the last batch with repeats) counts once: the first copy
    wins. Only images passed to ``update`` are evaluated."""

    def __init__(self, max_dets: int | None = None) -> None:
        self.max_dets = max_dets
        self._dets: dict[int, dict[str, np.ndarray]] = {}
        self.coco_eval: Any = None  # the last summarize()'s pycocotools COCOeval

    def __len__(self) -> int:
        return len(self._dets)

    @property
    def image_ids(self) -> list[int]:
        return sorted(self._dets)

    def reset(self) -> None:
        self._dets = {}

    def update(self, image_ids: Sequence[int] | torch.Tensor, detections: Sequence[Mapping[str, Any]]) -> None:
        """Add one batch: ``image_ids [B]`` and ``B`` dicts ``{"boxes" [N, 4] xyxy, "scores" [N], "labels" [N]}``."""
        ids = image_ids.tolist() if isinstance(image_ids, torch.Tensor) else [int(i) for i in image_ids]
        if len(ids) != len(detections):
            raise ValueError(f"got {len(ids)} image ids but {len(detections)} detection dicts")
        for image_id, det in zip(ids, detections):
            if image_id in self._dets:
                continue
            boxes, scores, labels = det_arrays(det, image_id)
            if self.max_dets is not None and len(scores) > self.max_dets:
                keep = np.sort(np.argsort(-scores, kind="stable")[: self.max_dets])
                boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            self._dets[int(image_id)] = {"boxes": boxes, "scores": scores, "labels": labels}

    def gather(self) -> None:
        """Merge every process's detections into every process (no-op without torch.distributed)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        parts: list[dict | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self._dets)
        self._dets = merge_detections(parts)

    def summarize(self, gt: GroundTruth) -> dict[str, float]:
        """Score the collected images (call on rank 0 after ``gather``); see ``evaluate_coco``."""
        if not self._dets:
            raise RuntimeError("CocoEvaluator.summarize: no images were added with update()")
        self.coco_eval = run_coco_eval(gt, self._dets, image_ids=self.image_ids)
        stats = {name: float(value) for name, value in zip(STAT_NAMES, self.coco_eval.stats)}
        logger.info("COCO evaluation on %d images:\n%s", len(self._dets), format_stats(stats))
        return stats


def merge_detections(parts: Iterable[Mapping[int, Any] | None]) -> dict[int, Any]:
    """Union of per-process ``{image_id: detections}``; the first copy of a repeated image wins."""
    merged: dict[int, Any] = {}
    for part in parts:
        for image_id, det in (part or {}).items():
            merged.setdefault(int(image_id), det)
    return merged


def load_coco_gt(gt: GroundTruth) -> Any:
    """Path / dict / ``COCO`` -> an indexed, validated ``pycocotools.coco.COCO``.  Annotations without
    ``area`` get ``w * h`` and without ``iscrowd`` get 0 (on a copy)."""
    from pycocotools.coco import COCO

    if isinstance(gt, COCO):
        return gt
    path = None
    if isinstance(gt, (str, os.PathLike)):
        path = Path(gt)
        gt = read_json(path)
    if not isinstance(gt, Mapping):
        if path is None:
            raise TypeError(f"ground truth must be a path, dict or COCO, got {type(gt).__name__}")
        raise DecodetError("not a COCO instances file: the top level must be a JSON object", path)
    dataset = _validated_gt(gt, path)
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _validated_gt(gt: Mapping[str, Any], path: Path | None) -> dict[str, Any]:
    def fail(message: str) -> DecodetError:
        return DecodetError(message if path else f"ground truth: {message}", path)

    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise fail(f"not a COCO instances file: '{key}' must be a list")
    try:
        image_ids = {img["id"] for img in gt["images"]}
        cat_ids = {cat["id"] for cat in gt["categories"]}
    except (KeyError, TypeError) as e:
        raise fail(f"every image and category needs an 'id' ({e!r})") from None
    annotations, ann_ids = [], set()
    for i, ann in enumerate(gt["annotations"]):
        if not isinstance(ann, Mapping) or not {"id", "image_id", "category_id", "bbox"} <= ann.keys():
            raise fail(f"annotation #{i} needs 'id', 'image_id', 'category_id' and 'bbox'")
        if ann["id"] in ann_ids:
            raise fail(f"annotation id {ann['id']} appears twice")
        ann_ids.add(ann["id"])
        if ann["image_id"] not in image_ids:
            raise fail(f"annotation {ann['id']} refers to image {ann['image_id']!r}, which is not in 'images'")
        if ann["category_id"] not in cat_ids:
            raise fail(f"annotation {ann['id']} has category {ann['category_id']!r}, which is not in 'categories'")
        if not _is_box(ann["bbox"]):
            raise fail(f"annotation {ann['id']} bbox must be [x, y, w, h] with w, h >= 0, got {ann['bbox']!r}")
        if "area" not in ann or "iscrowd" not in ann:
            ann = {"area": ann["bbox"][2] * ann["bbox"][3], "iscrowd": 0, **ann}
        annotations.append(ann)
    return {**gt, "annotations": annotations}


def _load_results(detections: Detections) -> tuple[list[dict], Path | None, set[int]]:
    """-> (fresh results list safe for ``loadRes`` to mutate, source file or None, image ids named)."""
    if isinstance(detections, (str, os.PathLike)):
        path = Path(detections)
        data = read_json(path)
        if not isinstance(data, list):
            raise DecodetError("a COCO results file must hold a JSON list of detections", path)
        return _validated_results(data, path), path, set()
    if isinstance(detections, Mapping):
        for image_id in detections:
            if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)):
                raise DecodetError(f"detections: image ids must be integers, got {image_id!r}")
        return detections_to_coco(detections, max_dets=None), None, {int(i) for i in detections}
    if isinstance(detections, (list, tuple)):
        return _validated_results(detections, None), None, set()
    raise TypeError(f"detections must be a results list, a path or a dict of detections, got {type(detections)}")


def _validated_results(data: Sequence[Any], path: Path | None) -> list[dict]:
    results = []
    for i, r in enumerate(data):
        ok = isinstance(r, Mapping) and {"image_id", "category_id", "bbox", "score"} <= r.keys()
        if not ok or not _is_box(r["bbox"]) or not _is_finite_number(r["score"]):
            where = "detections" if path is None else "detection"
            raise DecodetError(
                f"{where} #{i} must be {{'image_id', 'category_id', 'bbox': [x, y, w, h] (w, h >= 0), "
                f"'score'}} with finite numbers, got {r!r}"[:300],
                path,
            )
        results.append({**r, "bbox": list(r["bbox"])})
    return results


def _check_image_ids(ids: set, gt_ids: set, source: Path | None, what: str) -> None:
    unknown = ids - gt_ids
    if unknown:
        shown = ", ".join(repr(i) for i in sorted(unknown, key=str)[:5]) + (", ..." if len(unknown) > 5 else "")
        message = f"{what} {len(unknown)} image id(s) not in the ground truth: {shown}"
        raise DecodetError(message, source)


def _warn_unknown_categories(results: list[dict], cat_ids: set, source: Path | None) -> None:
    """COCOeval ignores detections of unknown categories; say so when that is most of them."""
    unknown = sum(r["category_id"] not in cat_ids for r in results)
    if unknown and unknown * 2 > len(results):
        logger.warning(
            "%s%d of %d detections have category ids not in the ground truth and are ignored "
            "(are labels logit indices instead of category ids?)",
            f"{source}: " if source else "",
            unknown,
            len(results),
        )


def _run_pycocotools(gt: Any, results: list[dict], image_ids: list[int]) -> Any:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()) as chatter:
        if results:
            dt = gt.loadRes(results)
        else:  # loadRes cannot take an empty list
            dt = COCO()
            dt.dataset = {"images": list(gt.dataset["images"]), "categories": gt.dataset["categories"]}
            dt.dataset["annotations"] = []
            dt.createIndex()
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    logger.debug("pycocotools:\n%s", chatter.getvalue())
    return ev


def _is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _is_box(bbox: Any) -> bool:
    return (
        isinstance(bbox, (list, tuple))
        and len(bbox) == 4
        and all(_is_finite_number(v) for v in bbox)
        and bbox[2] >= 0
        and bbox[3] >= 0
    )
