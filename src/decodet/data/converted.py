"""Datasets read from another format (YOLO, Pascal VOC) as COCO-style annotations.

Each reader builds, per split, the same structure a COCO instances file holds (``images``,
``annotations``, ``categories``) with :class:`CocoBuilder`. :func:`write_cached_annotations` stores
it as ``instances_<split>.json`` in a cache folder, so the rest of decodet (``CocoDetection``,
pycocotools evaluation, ``predict --ann``) reads every format through one code path.

The cache folder is ``$DECODET_CACHE/datasets`` (default ``~/.cache/decodet/datasets``, or the
system temp folder when that is not writable); one sub-folder per dataset location.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from decodet.data.problems import Problems
from decodet.errors import DecodetError
from decodet.io.atomic import atomic_write_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class CocoBuilder:
    """Accumulates one split's COCO instances dict; ids count from 1. Boxes (``[x, y, w, h]`` pixels)
    stay Python floats (no float32 rounding), so a conversion round-trips up to the decimals written."""

    def __init__(self, categories: list[dict[str, Any]]) -> None:
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.categories = categories

    def add_image(self, file_name: str, width: int, height: int) -> int:
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        return image_id

    def add_box(self, image_id: int, category_id: int, box: list[float], iscrowd: int = 0) -> None:
        x, y, w, h = (float(v) for v in box)
        self.annotations.append(
            {
                "id": len(self.annotations) + 1,
                "image_id": image_id,
                "category_id": category_id,
                "bbox": [x, y, w, h],
                "area": w * h,
                "iscrowd": iscrowd,
            }
        )

    def to_dict(self, description: str) -> dict[str, Any]:
        return {
            "info": {"description": description},
            "images": self.images,
            "annotations": self.annotations,
            "categories": self.categories,
        }


@dataclass
class ConvertedDataset:
    """A dataset read from another format.

    Attributes:
        format: ``"yolo"`` or ``"voc"``.
        source: the file or folder it was read from (for messages).
        root: its root folder.
        splits: split name -> ``(images_dir, coco_dict)``; ``file_name``s are relative to ``images_dir``.
        problems: what was skipped or clipped while reading, with files and lines.
    """

    format: str
    source: Path
    root: Path
    splits: dict[str, tuple[Path, dict[str, Any]]] = field(default_factory=dict)
    problems: Problems = field(default_factory=Problems)


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image as decoded upright (EXIF orientation applied), from its header only;
    OSError if the file is missing or not an image Pillow can identify."""
    try:
        with Image.open(path) as im:  # lazy: reads the header, not the pixels
            width, height = im.size
            if im.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED:
                width, height = height, width
    except (UnidentifiedImageError, ValueError, SyntaxError) as e:  # Pillow's header parse errors
        raise OSError(str(e)) from None
    return width, height


def under(root: Path, value: str) -> Path:
    """``value`` as a path: absolute (``~`` expanded) as it is, relative under ``root``."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else root / p


def dataset_root(file: Path, content: dict[str, Any]) -> Path:
    """A dataset file's ``path``: absent or empty, the file's folder; relative, relative to it
    (ultralytics: to the working directory, then its datasets_dir; decodet keeps the file's
    folder, which does not depend on where a command runs)."""
    value = content.get("path")
    if value is not None and not isinstance(value, str):
        raise DecodetError(f"'path' must be a folder name, got {value!r}", file)
    return under(file.parent, value) if value else file.parent


def cache_root() -> Path:
    """Where converted annotations are kept (see the module docstring)."""
    env = os.environ.get("DECODET_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "decodet"
    return root / "datasets"


def write_cached_annotations(dataset: ConvertedDataset) -> dict[str, Path]:
    """Write each split's COCO dict as ``instances_<split>.json`` (atomically) and return their paths."""
    source = str(dataset.source.resolve())
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset.root.resolve().name or "dataset")[:40]
    key = f"{slug}-{dataset.format}-{hashlib.sha1(source.encode()).hexdigest()[:12]}"
    for base in (cache_root(), Path(tempfile.gettempdir()) / "decodet-datasets"):
        folder = base / key
        try:
            folder.mkdir(parents=True, exist_ok=True)
            paths = {}
            for name, (_, coco) in dataset.splits.items():
                paths[name] = folder / f"instances_{name}.json"
                atomic_write_text(paths[name], json.dumps(coco))
            return paths
        except OSError:
            continue
    raise DecodetError("cannot write converted annotations (folder not writable; set DECODET_CACHE)", cache_root())
