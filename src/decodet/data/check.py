"""``decodet data check``: validate a dataset (any format) and summarise it, with histograms as a PNG.

The summary: images and boxes per split and class, boxes per image, box sizes in COCO's area
ranges (small < 32², medium < 96², large), crowd / difficult boxes. Problems are listed one by one:
file and line for YOLO label files, file for VOC XML files, annotation id for COCO JSON files
(the same problems training counts and skips), plus image files that are missing, unreadable or
of another size than annotated. Warnings (logged, and listed after the summary) say what training
would lack without being a problem of the files: no ``val`` split, so no evaluation
(:meth:`~decodet.data.spec.DataSpec.no_val_warning`, the line ``decodet train`` logs too).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from decodet.data.coco import ImageRecord, _check_box, parse_coco
from decodet.data.converted import image_size
from decodet.data.problems import Problems
from decodet.data.spec import resolve_data
from decodet.io.atomic import atomic_path

SMALL, MEDIUM = 32**2, 96**2  # COCO's area ranges
MAX_LISTED = 100

logger = logging.getLogger(__name__)


@dataclass
class SplitStats:
    """One split: ``boxes_per_image`` int [num_images]; ``labels`` int [num_boxes]; ``areas`` float [num_boxes]."""

    images: int
    boxes_per_image: np.ndarray
    labels: np.ndarray
    areas: np.ndarray
    crowd: int


@dataclass
class CheckResult:
    """``text`` the printable report; ``warnings`` one line each (no problem of the files: exit status 0)."""

    text: str
    problems: Problems
    class_names: list[str]
    splits: dict[str, SplitStats]
    warnings: list[str] = field(default_factory=list)


def check_dataset(data: str | os.PathLike, plot: str | os.PathLike | None = None) -> CheckResult:
    """Validate ``data``; return the printable summary (and write the histograms to ``plot``)."""
    spec = resolve_data(data)
    problems = Problems()
    problems.extend(spec.problems)
    for name, why in spec.missing.items():
        problems.add(f"unusable split {name!r}", spec.source, detail=why)
    warnings = [w for w in (spec.no_val_warning(),) if w]
    for warning in warnings:
        logger.warning("%s", warning)
    stats: dict[str, SplitStats] = {}
    class_names: list[str] = []
    for name, split in spec.splits.items():
        parsed = parse_coco(split.ann_file)
        class_names = class_names or parsed.class_names
        if spec.format == "coco":
            _annotation_problems(split.ann_file, parsed.images, problems)
        _image_problems(split.images_dir, parsed.images, split.ann_file if spec.format == "coco" else None, problems)
        stats[name] = _split_stats(parsed.images)
    text = _format(spec, stats, class_names, problems, warnings)
    if plot is not None:
        _plot(stats, class_names, Path(plot))
        text += f"\nhistograms written to {plot}"
    return CheckResult(text, problems, class_names, stats, warnings)


def _annotation_problems(ann_file: Path, images: list[ImageRecord], problems: Problems) -> None:
    """The per-annotation problems of a COCO file, by annotation id (same rules as :func:`parse_coco`)."""
    raw = json.loads(ann_file.read_bytes())
    records = {rec.id: rec for rec in images}
    cat_ids = {c.get("id") for c in raw["categories"] if isinstance(c, dict)}
    for i, ann in enumerate(raw["annotations"]):
        if not isinstance(ann, dict):
            problems.add("malformed annotation entries (not an object)", ann_file, detail=f"annotations[{i}]")
            continue
        ann_id = ann.get("id")
        rec = records.get(ann.get("image_id"))
        if rec is None:
            problems.add("annotations with unknown image", ann_file, annotation_id=ann_id)
        elif ann.get("category_id") not in cat_ids:
            problems.add("annotations with unknown category", ann_file, annotation_id=ann_id)
        elif not ann.get("iscrowd", 0):
            found: Counter = Counter()
            _check_box(ann.get("bbox"), rec, found)
            for kind in found:
                kind = "boxes reaching outside the image (clipped)" if kind == "clipped" else kind
                problems.add(kind, ann_file, annotation_id=ann_id)


def _image_problems(images_dir: Path, images: list[ImageRecord], ann_file: Path | None, problems: Problems) -> None:
    for rec in images:
        path = images_dir / rec.file_name
        where = ann_file or path
        detail = f"image id {rec.id}: {rec.file_name}" if ann_file else ""
        if not path.is_file():
            problems.add("missing images", where, detail=detail or str(path))
            continue
        try:
            size = image_size(path)
        except OSError as e:
            problems.add("unreadable images", path, detail=str(e))
            continue
        if size != (rec.width, rec.height):
            problems.add(
                "images of another size than annotated",
                where,
                detail=f"{detail + ', ' if detail else ''}{size[0]}x{size[1]}, annotated {rec.width}x{rec.height}",
            )


def _split_stats(images: list[ImageRecord]) -> SplitStats:
    boxes = np.concatenate([rec.boxes for rec in images]) if images else np.zeros((0, 4), np.float32)
    labels = np.concatenate([rec.labels for rec in images]) if images else np.zeros(0, np.int64)
    areas = (boxes[:, 2] - boxes[:, 0]).astype(np.float64) * (boxes[:, 3] - boxes[:, 1])
    per_image = np.asarray([len(rec.labels) for rec in images], dtype=np.int64)
    return SplitStats(len(images), per_image, labels, areas, sum(rec.num_crowd for rec in images))


def _format(
    spec: Any, stats: dict[str, SplitStats], class_names: list[str], problems: Problems, warnings: list[str]
) -> str:
    lines = [f"dataset {spec.source} ({spec.format}): {len(stats)} splits, {len(class_names)} classes"]
    for name, s in stats.items():
        per = s.boxes_per_image
        small = int((s.areas < SMALL).sum())
        medium = int(((s.areas >= SMALL) & (s.areas < MEDIUM)).sum())
        lines += [
            f"split {name}: {s.images} images, {len(s.labels)} boxes, {s.crowd} crowd/difficult, "
            f"{int((per == 0).sum())} images without boxes",
            f"  boxes per image: min {int(per.min()) if len(per) else 0}, mean {per.mean() if len(per) else 0:.2f}, "
            f"max {int(per.max()) if len(per) else 0}",
            f"  box sizes: small {small}, medium {medium}, large {len(s.areas) - small - medium}",
        ]
    width = max([len(n) for n in class_names] + [14])
    lines.append("boxes per class".ljust(width + 2) + "".join(f"{n:>10}" for n in stats))
    for label, cname in enumerate(class_names):
        counts = "".join(f"{int((s.labels == label).sum()):>10}" for s in stats.values())
        lines.append(f"  {cname:<{width}}{counts}")
    lines += [f"warning: {w}" for w in warnings]
    if not problems:
        lines.append("problems: none")
    else:
        counts = ", ".join(f"{n} {kind}" for kind, n in problems.counts().items())
        lines.append(f"problems: {len(problems)} ({counts})")
        lines += [f"  {p}" for p in problems.items[:MAX_LISTED]]
        if len(problems) > MAX_LISTED:
            lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    return "\n".join(lines)


def _plot(stats: dict[str, SplitStats], class_names: list[str], out: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, leaves the global backend alone

    fig = Figure(figsize=(12, 4.5))
    ax_cls, ax_size = fig.subplots(1, 2)
    x = np.arange(len(class_names))
    width = 0.8 / max(len(stats), 1)
    for i, (name, s) in enumerate(stats.items()):
        counts = np.bincount(s.labels, minlength=len(class_names))[: len(class_names)]
        ax_cls.bar(x + i * width - 0.4 + width / 2, counts, width, label=name)
    ax_cls.set_xticks(x, class_names, rotation=45, ha="right")
    ax_cls.set_ylabel("boxes")
    ax_cls.set_title("boxes per class")
    ax_cls.legend()
    sides = [np.sqrt(s.areas) for s in stats.values()]
    top = max([float(v.max()) for v in sides if len(v)] + [128.0])
    bins = np.linspace(0, top, 41)
    for name, v in zip(stats, sides):
        ax_size.hist(v, bins=bins, alpha=0.6, label=name)
    for edge, tag in ((32, "small | medium"), (96, "medium | large")):
        ax_size.axvline(edge, color="k", linestyle="--", linewidth=1)
        ax_size.text(edge, ax_size.get_ylim()[1] * 0.95, f" {tag}", fontsize=8, va="top")
    ax_size.set_xlabel("sqrt(box area) [px]")
    ax_size.set_ylabel("boxes")
    ax_size.set_title("box sizes")
    ax_size.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
