"""Figures for :mod:`decodet.evaluation.analysis`: per-class precision-recall curves and the confusion matrix.

Rendered with matplotlib's Agg canvas (no pyplot, no display, no global backend switch); each
figure is saved to a temp file and renamed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from decodet.io.atomic import atomic_path


def plot_pr_curves(ev: Any, rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """One panel per class: precision over COCO's 101 recall points at IoU 0.5, 0.75 and the
    mean over 0.5:0.95 (area all, 100 detections); ``rows`` are the per-class stats (titles)."""
    p = ev.params
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    area, maxdet = p.areaRngLbl.index("all"), p.maxDets.index(100)
    thresholds = np.asarray(p.iouThrs)
    recall_points = np.asarray(p.recThrs)
    k_count = len(rows)
    cols = min(4, max(1, k_count))
    nrows = max(1, math.ceil(k_count / cols))
    fig = _figure((3.2 * cols, 2.8 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    for k, (ax, row) in enumerate(zip(axes.flat, rows)):
        pr = precision[:, :, k, area, maxdet]  # [T, R]
        if (pr > -1).any():
            for iou, style in ((0.5, "-"), (0.75, "--")):
                t = int(np.argmin(np.abs(thresholds - iou)))
                ax.plot(recall_points, pr[t], style, label=f"IoU {iou:g}")
            ax.plot(recall_points, pr.mean(axis=0), ":", label="IoU .50:.95")
            ax.set_title(f"{row['name']}  AP {row['AP']:.3f}", fontsize=9)
        else:
            ax.set_title(f"{row['name']}  (no ground truth)", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
        if k == 0 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower left")
    for ax in list(axes.flat)[k_count:]:
        ax.axis("off")
    fig.supxlabel("recall", fontsize=9)
    fig.supylabel("precision", fontsize=9)
    _save(fig, path)


def plot_confusion(conf: Any, path: str | os.PathLike, iou_threshold: float, score_threshold: float) -> None:
    """The ``(K + 1) x (K + 1)`` counts as a heat map, each row normalised to its true-class
    total (the colour) with the count written in each non-empty cell."""
    matrix = conf.matrix
    labels = [*conf.names, "background"]
    n = len(labels)
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=float), where=totals > 0)
    side = min(20.0, 2.5 + 0.45 * n)
    fig = _figure((side, side * 0.9))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
    if n <= 30:  # counts stay readable
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    colour = "white" if share[i, j] > 0.5 else "black"
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion at IoU {iou_threshold:g}, score >= {score_threshold:g}", fontsize=9)
    _save(fig, path)


def _figure(size: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
