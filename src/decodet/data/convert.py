"""``decodet data convert``: any dataset decodet reads (COCO, YOLO, VOC) -> a COCO or YOLO dataset folder.

Every split of the source is read as COCO-style annotations (:func:`decodet.data.resolve_data`),
validated as training would (:func:`decodet.data.coco.parse_coco`), and written out:

- ``--to coco``: ``annotations/instances_<split>.json`` beside ``<split>/`` image folders;
- ``--to yolo``: ``data.yaml``, ``images/<split>/``, ``labels/<split>/`` (class indices follow the
  category ids in ascending order; an image without objects gets an empty label file).

Boxes keep full float precision in JSON and 8 decimals of the image side in YOLO label files, so
coordinates round-trip well within 1e-3 px. What a format cannot hold is left out and counted:
crowd (VOC ``difficult``) boxes in YOLO, which has no such flag. Invalid boxes and missing images
are left out as training would skip them. The output is built in a temporary folder beside the
destination and renamed into place when complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from decodet.data.coco import ImageRecord, _check_box, parse_coco
from decodet.data.spec import resolve_data
from decodet.data.yolo import copy_image, write_data_yaml, write_yolo_split
from decodet.errors import DecodetError

FORMATS = ("coco", "yolo")


@dataclass
class ConvertReport:
    """What a conversion wrote (``images`` / ``boxes`` per split) and left out (counted by reason)."""

    source_format: str
    images: dict[str, int] = field(default_factory=dict)
    boxes: dict[str, int] = field(default_factory=dict)
    left_out: Counter = field(default_factory=Counter)


def convert_dataset(src: str | os.PathLike, dst: str | os.PathLike, to: str, link: bool = False) -> ConvertReport:
    """Convert the dataset at ``src`` into a new ``to`` (``"coco"`` / ``"yolo"``) dataset folder ``dst``.

    Args:
        link: hard-link the images instead of copying them (falls back to a copy across devices).

    Raises:
        DecodetError: unknown format, ``dst`` exists and is not empty, or the source is unusable.
    """
    if to not in FORMATS:
        raise DecodetError(f"unknown target format {to!r} (choose from {', '.join(FORMATS)})")
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise DecodetError("destination exists and is not an empty folder", dst)
    spec = resolve_data(src)
    report = ConvertReport(spec.format)
    splits = {name: _load_split(split.images_dir, split.ann_file, to, report) for name, split in spec.splits.items()}
    categories = _merged_categories(splits)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        if to == "yolo":
            index_of = {c["id"]: i for i, c in enumerate(categories)}
            for name, (images_dir, coco) in splits.items():
                write_yolo_split(coco, images_dir, tmp, name, index_of, link)
            write_data_yaml(tmp, list(splits), [c["name"] for c in categories])
        else:
            (tmp / "annotations").mkdir()
            for name, (images_dir, coco) in splits.items():
                for img in coco["images"]:
                    copy_image(images_dir / img["file_name"], tmp / name / img["file_name"], link)
                (tmp / name).mkdir(exist_ok=True)
                coco = {**coco, "categories": categories}
                (tmp / "annotations" / f"instances_{name}.json").write_text(json.dumps(coco), encoding="utf-8")
        for name, (_, coco) in splits.items():
            report.images[name] = len(coco["images"])
            report.boxes[name] = len(coco["annotations"])
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return report


def _load_split(images_dir: Path, ann_file: Path, to: str, report: ConvertReport) -> tuple[Path, dict[str, Any]]:
    """The split's COCO dict keeping only what training would use (crowd boxes too, unless ``to`` is yolo)."""
    parse_coco(ann_file)  # the fatal checks, and the usual warning for skipped annotations
    raw = json.loads(ann_file.read_bytes())
    cat_ids = {c["id"] for c in raw["categories"]}
    images, records = [], {}
    for img in raw["images"]:
        if not (images_dir / img["file_name"]).is_file():
            report.left_out["missing images"] += 1
            continue
        images.append({k: img[k] for k in ("id", "file_name", "width", "height")})
        records[img["id"]] = ImageRecord(img["id"], img["file_name"], img["width"], img["height"], None, None)
    annotations = []
    for ann in raw["annotations"]:
        if not isinstance(ann, dict):
            continue
        rec = records.get(ann.get("image_id"))
        if rec is None or ann.get("category_id") not in cat_ids:
            report.left_out["annotations of a missing image or unknown category"] += 1
            continue
        if _check_box(ann.get("bbox"), rec, Counter()) is None:
            report.left_out["invalid boxes"] += 1
            continue
        crowd = 1 if ann.get("iscrowd", 0) else 0
        if crowd and to == "yolo":
            report.left_out["crowd / difficult boxes (YOLO has no such flag)"] += 1
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, rec.width), min(y + h, rec.height)
        area = ann.get("area")
        area = float(area) if isinstance(area, (int, float)) and math.isfinite(area) else (x1 - x0) * (y1 - y0)
        annotations.append(
            {
                "id": ann.get("id", len(annotations) + 1),
                "image_id": rec.id,
                "category_id": ann["category_id"],
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": area,
                "iscrowd": crowd,
            }
        )
    categories = [{"id": c["id"], "name": c.get("name") or f"class_{c['id']}"} for c in raw["categories"]]
    return images_dir, {"images": images, "annotations": annotations, "categories": categories}


def _merged_categories(splits: dict[str, tuple[Path, dict[str, Any]]]) -> list[dict[str, Any]]:
    names: dict[int, str] = {}
    for name, (_, coco) in splits.items():
        for cat in coco["categories"]:
            if names.setdefault(cat["id"], cat["name"]) != cat["name"]:
                other = names[cat["id"]]
                raise DecodetError(f"category id {cat['id']} is {other!r} in one split, {cat['name']!r} in {name!r}")
    return [{"id": cid, "name": names[cid]} for cid in sorted(names)]
