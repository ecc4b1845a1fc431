"""Evaluation that explains itself: per-class numbers, a confusion matrix, the worst images.

Everything starts from one summarised ``pycocotools`` ``COCOeval`` (what
:func:`~decodet.evaluation.evaluator.run_coco_eval` and ``CocoEvaluator.summarize`` produce), so the per-class
numbers break down exactly the 12 stats printed beside them:

- per-class AP is the mean of ``eval["precision"][:, :, k, area=all, maxDets=100]`` over its valid (``> -1``)
  entries, the pycocotools definition; since a class's entries are all valid or all ``-1``, the mean of the
  per-class APs over classes with ground truth *is* the overall AP. AP50 uses the IoU 0.5 row, AR100
  ``eval["recall"][:, k, all, 100]``.
- the confusion matrix matches, per image, ground-truth boxes and detections scoring at least
  ``score_threshold`` one to one (any classes) at IoU >= ``iou_threshold``: same-class pairs first, then the
  largest total IoU (``scipy.optimize.linear_sum_assignment``). Rows are the true class, columns the predicted
  class; the last row / column is *background*: a ground-truth box nobody matched (missed) lands in its class
  row's background column, a detection matching nothing (false) in the background row. Detections that fall on
  a crowd region (crowd IoU, intersection over detection area >= the threshold) are ignored, as COCO does.

:func:`write_analysis` writes into a folder::

    per_class.csv           category_id, name, AP, AP50, AR100, num_gt
    pr_curves.png           precision-recall curve per class (IoU 0.5, 0.75, and 0.5:0.95 mean)
    confusion_matrix.csv    counts, (K + 1) x (K + 1) with background last
    confusion_matrix.png
    worst_images/           the images with the most missed + false boxes, drawn, and index.csv
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from decodet.io.atomic import atomic_write_text

log = logging.getLogger(__name__)

PER_CLASS_CSV = "per_class.csv"
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"
PR_PNG = "pr_curves.png"
WORST_DIR = "worst_images"
PER_CLASS_COLUMNS = ("category_id", "name", "AP", "AP50", "AR100", "num_gt")


def per_class_stats(ev: Any) -> list[dict[str, Any]]:
    """One row per category of a summarised ``COCOeval``: AP, AP50, AR100 (area all, 100 detections; ``-1.0``
    when the class has no ground truth, as pycocotools) and ``num_gt``, the non-crowd ground-truth boxes of
    the evaluated images."""
    p = ev.params
    precision, recall = ev.eval["precision"], ev.eval["recall"]  # [T, R, K, A, M], [T, K, A, M]
    area, maxdet = p.areaRngLbl.index("all"), p.maxDets.index(100)
    iou50 = int(np.argmin(np.abs(np.asarray(p.iouThrs) - 0.5)))
    rows = []
    for k, cat_id in enumerate(p.catIds):
        num_gt = len(ev.cocoGt.getAnnIds(imgIds=p.imgIds, catIds=[cat_id], iscrowd=False))
        rows.append(
            {
                "category_id": int(cat_id),
                "name": str(ev.cocoGt.cats[cat_id].get("name", cat_id)),
                "AP": _valid_mean(precision[:, :, k, area, maxdet]),
                "AP50": _valid_mean(precision[iou50, :, k, area, maxdet]),
                "AR100": _valid_mean(recall[:, k, area, maxdet]),
                "num_gt": num_gt,
            }
        )
    return rows


def format_per_class(rows: Sequence[dict[str, Any]]) -> str:
    """The per-class table as aligned text (``-`` where a class has no ground truth)."""
    width = max([len("class"), *(len(str(r["name"])) for r in rows)])
    lines = [f"{'class':<{width}}  {'AP':>6} {'AP50':>6} {'AR100':>6} {'boxes':>6}"]
    for r in rows:
        nums = " ".join(f"{r[k]:6.3f}" if r[k] >= 0 else f"{'-':>6}" for k in ("AP", "AP50", "AR100"))
        lines.append(f"{str(r['name']):<{width}}  {nums} {r['num_gt']:>6d}")
    return "\n".join(lines)


def read_per_class_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``per_class.csv`` written by :func:`write_analysis`, with numbers parsed."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    numbers = {"category_id": int, "num_gt": int, "AP": float, "AP50": float, "AR100": float}
    return [{k: numbers[k](v) if k in numbers else v for k, v in r.items()} for r in rows]


def _valid_mean(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


@dataclass
class Confusion:
    """``matrix [K + 1, K + 1]`` int64 (rows: true class, columns: predicted; index K: background),
    ``category_ids`` / ``names`` of the first K rows, per image ``(missed, false)`` counts where a wrong-class
    match counts as one of each, and per image the annotation ids of the ground-truth boxes not found with
    their class (missed or matched by a wrong class)."""

    matrix: np.ndarray
    category_ids: list[int]
    names: list[str]
    errors: dict[int, tuple[int, int]]
    missed: dict[int, list[int]]


def confusion_matrix(ev: Any, iou_threshold: float = 0.5, score_threshold: float = 0.3) -> Confusion:
    """The confusion matrix of the detections and ground truth a ``COCOeval`` was run on (see module docstring)."""
    from pycocotools import mask as mask_utils
    from scipy.optimize import linear_sum_assignment

    cat_ids = [int(c) for c in ev.params.catIds]
    index = {c: i for i, c in enumerate(cat_ids)}
    bg = len(cat_ids)
    matrix = np.zeros((bg + 1, bg + 1), dtype=np.int64)
    errors: dict[int, tuple[int, int]] = {}
    missed_ids: dict[int, list[int]] = {}
    gt_coco, dt_coco = ev.cocoGt, ev.cocoDt
    for image_id in ev.params.imgIds:
        gts = [a for a in gt_coco.imgToAnns.get(image_id, []) if a["category_id"] in index]
        dts = [
            d
            for d in dt_coco.imgToAnns.get(image_id, [])
            if d["category_id"] in index and d["score"] >= score_threshold
        ]
        crowd = [a for a in gts if a.get("iscrowd", 0)]
        gts = [a for a in gts if not a.get("iscrowd", 0)]
        g_cls = np.array([index[a["category_id"]] for a in gts], dtype=np.int64)
        d_cls = np.array([index[d["category_id"]] for d in dts], dtype=np.int64)
        pairs: list[tuple[int, int]] = []
        if gts and dts:
            iou = np.asarray(mask_utils.iou([d["bbox"] for d in dts], [a["bbox"] for a in gts], [0] * len(gts)))
            ok = iou >= iou_threshold  # [D, G]
            # weight: 1 for a same-class pair, plus its IoU; pairs under the threshold weigh nothing
            weight = np.where(ok, iou + (d_cls[:, None] == g_cls[None, :]), 0.0)
            rows, cols = linear_sum_assignment(weight, maximize=True)
            pairs = [(int(g), int(d)) for d, g in zip(rows, cols) if ok[d, g]]
        matched_g = {g for g, _ in pairs}
        matched_d = {d for _, d in pairs}
        free_d = [d for d in range(len(dts)) if d not in matched_d]
        if crowd and free_d:  # detections on a crowd region are neither right nor wrong
            on_crowd = np.asarray(
                mask_utils.iou([dts[d]["bbox"] for d in free_d], [a["bbox"] for a in crowd], [1] * len(crowd))
            )
            free_d = [d for d, hit in zip(free_d, (on_crowd >= iou_threshold).any(axis=1)) if not hit]
        confused = []
        for g, d in pairs:
            matrix[g_cls[g], d_cls[d]] += 1
            if g_cls[g] != d_cls[d]:
                confused.append(g)
        missed = [g for g in range(len(gts)) if g not in matched_g]
        for g in missed:
            matrix[g_cls[g], bg] += 1
        for d in free_d:
            matrix[bg, d_cls[d]] += 1
        errors[int(image_id)] = (len(missed) + len(confused), len(free_d) + len(confused))
        missed_ids[int(image_id)] = [int(gts[g]["id"]) for g in sorted(missed + confused)]
    names = [str(gt_coco.cats[c].get("name", c)) for c in cat_ids]
    return Confusion(matrix, cat_ids, names, errors, missed_ids)


def confusion_csv(conf: Confusion) -> str:
    """The matrix as CSV text: a header of predicted classes, one row per true class."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    labels = [*conf.names, "background"]
    writer.writerow(["true \\ predicted", *labels])
    for label, row in zip(labels, conf.matrix.tolist()):
        writer.writerow([label, *row])
    return buf.getvalue()


def write_analysis(
    out_dir: str | os.PathLike,
    ev: Any,
    images_dir: str | os.PathLike | None = None,
    score_threshold: float = 0.3,
    iou_threshold: float = 0.5,
    num_worst: int = 12,
) -> list[dict[str, Any]]:
    """Write the per-class table, PR curves, confusion matrix and worst images of ``ev`` into ``out_dir``
    (module docstring); the drawn images need ``images_dir`` (skipped without it). Returns the per-class rows
    (also logged as a table)."""
    from decodet.evaluation.analysis_plots import plot_confusion, plot_pr_curves
    from decodet.evaluation.worst_images import write_worst_images

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = per_class_stats(ev)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=PER_CLASS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / PER_CLASS_CSV, buf.getvalue())
    log.info("per-class results:\n%s", format_per_class(rows))

    conf = confusion_matrix(ev, iou_threshold, score_threshold)
    atomic_write_text(out / CONFUSION_CSV, confusion_csv(conf))
    plot_pr_curves(ev, rows, out / PR_PNG)
    plot_confusion(conf, out / CONFUSION_PNG, iou_threshold, score_threshold)
    if images_dir is not None and num_worst > 0:
        write_worst_images(out / WORST_DIR, ev, conf, Path(images_dir), score_threshold, num_worst)
    log.info("evaluation plots written to %s", out)
    return rows
