"""COCO-format detection dataset: validated annotations, contiguous labels, (image, target) samples.

Parsing is strict about structure and forgiving about individual annotations:

- fatal (:class:`DecodetError` naming the JSON file): unreadable or malformed JSON, a missing ``images`` /
  ``annotations`` / ``categories`` list, no categories, an image without ``id`` / ``file_name`` / positive
  ``width`` and ``height``, duplicate image or category ids;
- counted, then reported in one ``logging`` warning per file: annotations naming an unknown image or category,
  boxes that are missing, not finite, of zero/negative size or entirely outside the image (dropped), boxes
  reaching more than a pixel outside the image (clipped).

Category ids map to contiguous labels ``0..K-1`` in ascending id order: ``category_ids[label]`` is the id,
``label_of[id]`` the label. Crowd annotations (``iscrowd=1``) are left out of the training targets (COCO
evaluation still reads them from the JSON). Images without annotations are kept."""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from decodet.data.images import DEFAULT_MAX_PIXELS, load_image
from decodet.errors import DecodetError
from decodet.io.files import read_json

logger = logging.getLogger(__name__)

CLIP_TOLERANCE = 1.0  # overshoots up to this many px (rounding in many exported datasets) are clipped unreported

Transforms = Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]]


@dataclass
class ImageRecord:
    """One image: ``boxes`` float32 [N, 4] xyxy pixels of the annotated ``width`` x ``height``; ``labels``
    int64 [N] contiguous; ``num_crowd`` crowd annotations left out."""

    id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    num_crowd: int = 0


@dataclass
class CocoAnnotations:
    """A parsed, validated COCO annotation file (see :func:`parse_coco`)."""

    images: list[ImageRecord]
    category_ids: list[int]
    class_names: list[str]
    issues: Counter


def parse_coco(ann_file: str | os.PathLike) -> CocoAnnotations:
    """Read and validate a COCO detection JSON (module docstring): images in file order, categories sorted by
    id, the counted problems in ``issues`` (also logged as one warning)."""
    ann_file = Path(ann_file)
    content = read_json(ann_file, "annotation file")
    if not isinstance(content, dict):
        raise DecodetError("expected a JSON object with 'images', 'annotations' and 'categories'", ann_file)
    for key in ("images", "annotations", "categories"):
        if not isinstance(content.get(key), list):
            problem = "missing" if key not in content else "not a list"
            raise DecodetError(f"'{key}' is {problem} (not a COCO detection file?)", ann_file)

    categories = _parse_categories(content["categories"], ann_file)
    category_ids = sorted(categories)
    label_of = {cid: label for label, cid in enumerate(category_ids)}
    images = _parse_images(content["images"], ann_file)
    index = {rec.id: rec for rec in images}

    issues: Counter = Counter()
    boxes: dict[int, list[list[float]]] = {rec.id: [] for rec in images}
    labels: dict[int, list[int]] = {rec.id: [] for rec in images}
    for ann in content["annotations"]:
        if not isinstance(ann, dict):
            issues["malformed annotation entries (not an object)"] += 1
            continue
        rec = index.get(_as_int(ann.get("image_id")))
        if rec is None:
            issues["annotations with unknown image"] += 1
            continue
        category_id = _as_int(ann.get("category_id"))
        if category_id not in label_of:
            issues["annotations with unknown category"] += 1
            continue
        if ann.get("iscrowd", 0):
            rec.num_crowd += 1
            continue
        box = _check_box(ann.get("bbox"), rec, issues)
        if box is not None:
            boxes[rec.id].append(box)
            labels[rec.id].append(label_of[category_id])

    for rec in images:
        rec.boxes = np.asarray(boxes[rec.id], dtype=np.float32).reshape(-1, 4)
        rec.labels = np.asarray(labels[rec.id], dtype=np.int64)
    if issues:
        logger.warning("%s: %s", ann_file, _summary(issues))
    return CocoAnnotations(images, category_ids, [categories[c] for c in category_ids], issues)


class CocoDetection(Dataset):
    """A COCO-format detection split as a torch ``Dataset``.

    Args:
        transforms: ``(image, target) -> (image, target)`` on ``tv_tensors`` (``build_transforms``); ``None``
            only converts the image to float in [0, 1].
        skip_bad_images: on an unreadable image, warn and return the next readable sample instead of raising.
            Files missing from ``images_dir`` are found up front (one listing per folder) and reported in one
            warning; none present is a :class:`DecodetError`.
        max_pixels: decompression-bomb guard passed to :func:`~decodet.data.images.load_image`.

    ``dataset[i]`` is ``(image float [3, H, W], target)``: ``boxes`` (``tv_tensors.BoundingBoxes``, XYXY pixels
    of the transformed image), ``labels`` (int64, contiguous), ``image_id``, ``orig_size`` (int64 annotated
    ``[height, width]``, the frame predictions are reported in). Batch with ``collate``."""

    def __init__(
        self,
        images_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        transforms: Transforms | None = None,
        skip_bad_images: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.ann_file = Path(ann_file)
        if not self.images_dir.is_dir():
            raise DecodetError("image folder not found", self.images_dir)
        parsed = parse_coco(self.ann_file)
        self.records = parsed.images
        self.category_ids = parsed.category_ids
        self.class_names = parsed.class_names
        self.label_of = {cid: label for label, cid in enumerate(self.category_ids)}
        self.transforms = transforms
        self.skip_bad_images = skip_bad_images
        self.max_pixels = max_pixels
        self._bad: set[int] = set()
        if skip_bad_images and self.records:
            self._skip_missing_files()

    @classmethod
    def from_split(cls, split: Any, **kwargs: Any) -> CocoDetection:
        """Build from a :class:`decodet.data.spec.SplitSpec`."""
        return cls(split.images_dir, split.ann_file, **kwargs)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @property
    def image_ids(self) -> list[int]:
        return [rec.id for rec in self.records]

    def to_category_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """Contiguous labels [N] -> COCO category ids [N] (int64)."""
        lut = torch.as_tensor(self.category_ids, dtype=torch.int64, device=labels.device)
        return lut[labels.long()]

    def to_labels(self, category_ids: torch.Tensor) -> torch.Tensor:
        """COCO category ids [N] -> contiguous labels [N] (int64); unknown ids raise KeyError."""
        return torch.as_tensor([self.label_of[int(c)] for c in category_ids], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, index: int) -> Path:
        return self.images_dir / self.records[index].file_name

    def load_image(self, index: int) -> Image.Image:
        """The decoded RGB image of sample ``index`` (DecodetError naming the file if unreadable)."""
        return load_image(self.image_path(index), max_pixels=self.max_pixels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        index, pil = self._load_readable(index)
        rec = self.records[index]
        image = tv_tensors.Image(F.pil_to_tensor(pil))
        h, w = image.shape[-2:]
        boxes = torch.from_numpy(rec.boxes.copy())
        if (w, h) != (rec.width, rec.height):
            # The file disagrees with the JSON: keep the boxes on the same content.
            logger.debug("%s: image is %dx%d, annotated as %dx%d", self.image_path(index), w, h, rec.width, rec.height)
            boxes *= torch.tensor([w / rec.width, h / rec.height] * 2)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w), clamping_mode="hard"),
            "labels": torch.from_numpy(rec.labels.copy()),
            "image_id": rec.id,
            "orig_size": torch.tensor([rec.height, rec.width], dtype=torch.int64),
        }
        if self.transforms is not None:
            return self.transforms(image, target)
        return F.to_dtype(image, torch.float32, scale=True), target

    def _load_readable(self, index: int) -> tuple[int, Image.Image]:
        n = len(self.records)
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            try:
                return i, self.load_image(i)
            except DecodetError as e:
                if not self.skip_bad_images:
                    raise
                self._bad.add(i)
                logger.warning("%s; skipping it (skip_bad_images)", e)
        raise DecodetError("no readable image in this dataset", self.images_dir)

    def _skip_missing_files(self) -> None:
        """Drop images whose file is absent (one warning), so ``len`` counts those used; raise if all are."""
        listings: dict[Path, set[str]] = {}
        missing = []
        for i in range(len(self.records)):
            path = self.image_path(i)
            if path.parent not in listings:
                try:
                    listings[path.parent] = set(os.listdir(path.parent))
                except OSError:
                    listings[path.parent] = set()
            if path.name not in listings[path.parent] and not path.exists():  # (case-insensitive file systems)
                missing.append(i)
        if not missing:
            return
        first, total = self.records[missing[0]].file_name, len(self.records)
        if len(missing) == total:
            raise DecodetError(
                f"none of the {len(missing)} images of {self.ann_file.name} is in this folder (first: {first})",
                self.images_dir,
            )
        gone = set(missing)
        self.records = [rec for i, rec in enumerate(self.records) if i not in gone]
        logger.warning(
            "%s: %d of %d images are missing (first: %s); they are skipped, %d are used",
            self.images_dir,
            len(missing),
            total,
            first,
            len(self.records),
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} images, {self.num_classes} classes, "
            f"images_dir={str(self.images_dir)!r}, ann_file={str(self.ann_file)!r})"
        )


def _parse_categories(entries: list[Any], ann_file: Path) -> dict[int, str]:
    categories: dict[int, str] = {}
    for i, cat in enumerate(entries):
        cid = _as_int(cat.get("id")) if isinstance(cat, dict) else None
        if cid is None:
            raise DecodetError(f"categories[{i}] has no integer 'id'", ann_file)
        if cid in categories:
            raise DecodetError(f"duplicate category id {cid} (categories[{i}])", ann_file)
        name = cat.get("name")
        categories[cid] = str(name) if name not in (None, "") else f"class_{cid}"
    if not categories:
        raise DecodetError("'categories' is empty: no classes to detect", ann_file)
    return categories


def _parse_images(entries: list[Any], ann_file: Path) -> list[ImageRecord]:
    records: list[ImageRecord] = []
    first_seen: dict[int, int] = {}
    for i, img in enumerate(entries):
        if not isinstance(img, dict):
            raise DecodetError(f"images[{i}] is not an object", ann_file)
        image_id = _as_int(img.get("id"))
        if image_id is None:
            raise DecodetError(f"images[{i}] has no integer 'id'", ann_file)
        if image_id in first_seen:
            where = f"images[{first_seen[image_id]}] and images[{i}]"
            raise DecodetError(f"duplicate image id {image_id} ({where})", ann_file)
        first_seen[image_id] = i
        file_name = img.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise DecodetError(f"images[{i}] (id {image_id}) has no 'file_name'", ann_file)
        width, height = _as_int(img.get("width")), _as_int(img.get("height"))
        if width is None or height is None or width <= 0 or height <= 0:
            raise DecodetError(f"images[{i}] (id {image_id}) needs positive integer 'width' and 'height'", ann_file)
        empty = np.zeros((0, 4), np.float32)
        records.append(ImageRecord(image_id, file_name, width, height, empty, np.zeros(0, np.int64)))
    return records


def _check_box(bbox: Any, rec: ImageRecord, issues: Counter) -> list[float] | None:
    """COCO ``[x, y, w, h]`` -> clipped ``[x0, y0, x1, y1]``, or None (counted in ``issues``)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        issues["annotations without a 4-number bbox"] += 1
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        issues["annotations without a 4-number bbox"] += 1
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        issues["boxes with NaN or infinite values"] += 1
        return None
    if w <= 0 or h <= 0:
        issues["boxes with zero or negative size"] += 1
        return None
    x0, y0, x1, y1 = x, y, x + w, y + h
    cx0, cy0 = min(max(x0, 0.0), rec.width), min(max(y0, 0.0), rec.height)
    cx1, cy1 = min(max(x1, 0.0), rec.width), min(max(y1, 0.0), rec.height)
    if cx1 - cx0 <= 0 or cy1 - cy0 <= 0:
        issues["boxes entirely outside the image"] += 1
        return None
    box = [float(v) for v in np.asarray([cx0, cy0, cx1, cy1], dtype=np.float32)]  # as stored
    if box[2] <= box[0] or box[3] <= box[1]:  # a positive size below float32 resolution
        issues["boxes with zero or negative size"] += 1
        return None
    overshoot = max(cx0 - x0, cy0 - y0, x1 - cx1, y1 - cy1)
    if overshoot > CLIP_TOLERANCE:
        issues["clipped"] += 1
    return box


def _summary(issues: Counter) -> str:
    dropped = [f"{n} {what}" for what, n in issues.items() if what != "clipped"]
    parts = [f"dropped {', '.join(dropped)}"] if dropped else []
    if issues["clipped"]:
        parts.append(f"clipped {issues['clipped']} boxes reaching outside the image")
    return "; ".join(parts)


def _as_int(value: Any) -> int | None:
    """An integer id/size from JSON (``3`` or ``3.0``); None for anything else (bools included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None
