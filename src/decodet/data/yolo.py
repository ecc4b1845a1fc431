"""YOLO (ultralytics layout) datasets: read them as COCO-style splits, write COCO-style splits as YOLO.

Layout::

    data.yaml            train: images/train     # image folder (searched recursively), a .txt list of
                         val: images/val         #   image paths, or a list of those
                         names: [cat, dog]       # or {0: cat, 1: dog}
                         # path: ...             # optional dataset root; absent: this file's folder
    images/train/a.jpg
    labels/train/a.txt   one object per line: ``class cx cy w h``, centre and size divided by the image size

Without ``path`` the root is the file's own folder, for decodet and ultralytics alike (``check_det_dataset``),
so the file works from any working directory (``decodet data convert --to yolo`` writes none: ultralytics would
read ``path: .`` against the working directory). A relative ``path`` is where the two differ: decodet reads it
against this file's folder, ultralytics against the working directory (then its ``datasets_dir``).

An image's label file is its path with the last ``images`` folder replaced by ``labels`` and the suffix by
``.txt``; an image without one has no objects. A polygon line (``class x1 y1 x2 y2 ...``, ultralytics'
segmentation labels) counts as its bounding box. Lines of a ``.txt`` image list are relative to the list's
folder. Class ``k`` becomes COCO category id ``k``, so predictions report the YOLO class index. Image sizes
come from the image headers (no pixel decoding).

Fatal (:class:`DecodetError` naming ``data.yaml``): malformed YAML, no usable ``names``, a split path that does
not exist, a split without images. Counted, skipped and listed (file and line) by ``decodet data check``: label
lines with a wrong number of fields, a non-numeric or non-finite value, a class not in ``names``, a box of zero
size or entirely outside the image; missing or unreadable images; unreadable label files (their image is
skipped); label files with no image beside them (orphans, e.g. an image deleted but not its labels: ignored).
Boxes reaching more than a pixel outside the image are clipped and listed."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from decodet.data.coco import CLIP_TOLERANCE
from decodet.data.converted import IMAGE_SUFFIXES, CocoBuilder, ConvertedDataset, dataset_root, image_size, under
from decodet.data.problems import Problems
from decodet.errors import DecodetError

logger = logging.getLogger(__name__)

YOLO_SPLITS = ("train", "val", "test")
DECIMALS = 8  # normalised coordinates: 1e-8 of the image side, far below 1e-3 px for any real image


def is_yolo_file(content: dict[str, Any]) -> bool:
    """Whether a parsed dataset file is a YOLO ``data.yaml`` (a split given as a path or a list of paths)."""
    return any(isinstance(content.get(k), (str, list)) for k in YOLO_SPLITS)


def read_yolo(file: Path, content: dict[str, Any]) -> ConvertedDataset:
    """Read the dataset described by ``file`` (its parsed ``content``) into COCO-style splits."""
    names = _names(content, file)
    root = dataset_root(file, content)
    if not root.is_dir():
        raise DecodetError(f"dataset root (path) not found: {root}", file)
    categories = [{"id": k, "name": v} for k, v in sorted(names.items())]
    mixed = [k for k in YOLO_SPLITS if isinstance(content.get(k), dict)]
    if mixed:
        raise DecodetError(
            f"split {mixed[0]!r} is a mapping (COCO form) but other splits are paths (YOLO form): "
            "use one form for every split",
            file,
        )
    dataset = ConvertedDataset("yolo", file, root)
    label_dirs: dict[Path, tuple[Path, bool]] = {}  # label folder -> (its image folder, recursive)
    for split in YOLO_SPLITS:
        value = content.get(split)
        if value is None:
            continue
        entries = [value] if isinstance(value, str) else value
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise DecodetError(f"split {split!r} must be a path or a list of paths, got {value!r}", file)
        images = _list_images(entries, root, file, split, dataset.problems, label_dirs)
        if not images:
            raise DecodetError(f"split {split!r} has no images ({', '.join(entries)})", file)
        images_dir = Path(os.path.commonpath([p.parent for p in images]))
        builder = CocoBuilder(categories)
        for path in images:
            try:
                width, height = image_size(path)
            except OSError as e:
                dataset.problems.add("unreadable images", path, detail=str(e))
                continue
            boxes = _read_labels(label_path(path), width, height, names, dataset.problems)
            if boxes is None:
                continue
            image_id = builder.add_image(path.relative_to(images_dir).as_posix(), width, height)
            for category_id, box in boxes:
                builder.add_box(image_id, category_id, box)
        dataset.splits[split] = (images_dir, builder.to_dict(f"YOLO dataset {file}, {split} split"))
    if not dataset.splits:
        raise DecodetError("dataset file names no split (expected train/val/test image folders)", file)
    _orphan_labels(label_dirs, dataset.problems)
    dataset.problems.log(logger, file)
    return dataset


def label_path(image: Path) -> Path:
    """``.../images/x/a.jpg`` -> ``.../labels/x/a.txt`` (the last ``images`` folder; else beside the image)."""
    return (_labels_folder(image.parent) or image.parent) / image.with_suffix(".txt").name


def _labels_folder(folder: Path) -> Path | None:
    """``.../images/x`` -> ``.../labels/x`` (the last ``images`` component); None without one."""
    parts = list(folder.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts)
    return None


def _orphan_labels(label_dirs: dict[Path, tuple[Path, bool]], problems: Problems) -> None:
    """Record each ``.txt`` file of ``label_dirs`` with no image of the same name in the matching image folder."""
    image_stems: dict[Path, set[str]] = {}
    orphans: set[Path] = set()
    for labels, (images, recursive) in label_dirs.items():
        if not labels.is_dir():
            continue
        for label in labels.rglob("*.txt") if recursive else labels.glob("*.txt"):
            rel = label.relative_to(labels)
            folder = images / rel.parent
            if folder not in image_stems:
                found = folder.iterdir() if folder.is_dir() else ()
                image_stems[folder] = {p.stem for p in found if p.suffix.lower() in IMAGE_SUFFIXES}
            if rel.stem not in image_stems[folder] and label.is_file():
                orphans.add(label)
    for label in sorted(orphans):
        problems.add("label files without an image", label)


def _names(content: dict[str, Any], file: Path) -> dict[int, str]:
    names = content.get("names")
    if isinstance(names, list):
        return {i: str(n) for i, n in enumerate(names)}
    if isinstance(names, dict) and names:
        out = {}
        for key, name in names.items():
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise DecodetError(f"'names' keys must be class indices, got {key!r}", file) from None
            if index < 0:
                raise DecodetError(f"'names' keys must be class indices >= 0, got {key!r}", file)
            out[index] = str(name)
        return out
    nc = content.get("nc")
    if names is None and isinstance(nc, int) and not isinstance(nc, bool) and nc > 0:
        return {i: f"class_{i}" for i in range(nc)}
    raise DecodetError("'names' must be a list of class names or a {index: name} mapping", file)


def _list_images(
    entries: list[str],
    root: Path,
    file: Path,
    split: str,
    problems: Problems,
    label_dirs: dict[Path, tuple[Path, bool]],
) -> list[Path]:
    """The split's images, each once, in order; adds the label folders to search for orphans to ``label_dirs``."""
    images: list[Path] = []
    for entry in entries:
        path = under(root, entry)
        if not path.exists() and entry.startswith("../"):
            path = root / entry[3:]  # exports that name splits from a sub-folder (``train: ../train/images``)
        if path.is_dir():
            images += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if (labels := _labels_folder(path)) is not None:
                label_dirs[labels] = (path, True)  # the whole label tree, even where no image is left
        elif path.is_file() and path.suffix.lower() == ".txt":
            images += _read_image_list(path, problems)
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            raise DecodetError(f"split {split!r}: {path} not found (expected an image folder or a .txt list)", file)
    for folder in {p.parent for p in images}:  # each image's label folder (not below it)
        if (labels := _labels_folder(folder)) is not None:
            label_dirs.setdefault(labels, (folder, False))
    return list(dict.fromkeys(images))  # each image once, in order


def _read_image_list(list_file: Path, problems: Problems) -> list[Path]:
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DecodetError(f"cannot read image list: {e}", list_file) from None
    images = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        path = under(list_file.parent, line.strip())
        if path.is_file():
            images.append(path)
        else:
            problems.add("missing images", list_file, lineno, detail=str(path))
    return images


def _read_labels(
    file: Path, width: int, height: int, names: dict[int, str], problems: Problems
) -> list[tuple[int, list[float]]] | None:
    """The ``(class, [x, y, w, h] pixels)`` boxes of one label file; None if it cannot be read."""
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []  # no objects in this image
    except (OSError, UnicodeDecodeError) as e:
        problems.add("unreadable label files (image skipped)", file, detail=str(e))
        return None
    boxes = []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        box = _parse_line(fields, width, height, names, file, lineno, problems)
        if box is not None:
            boxes.append(box)
    return boxes


def _parse_line(
    fields: list[str], width: int, height: int, names: dict[int, str], file: Path, lineno: int, problems: Problems
) -> tuple[int, list[float]] | None:
    if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
        problems.add("label lines with a wrong number of fields", file, lineno, f"{len(fields)}, expected 5")
        return None
    try:
        values = [float(v) for v in fields]
    except ValueError:
        problems.add("label lines with a non-numeric field", file, lineno, " ".join(fields)[:60])
        return None
    if not all(math.isfinite(v) for v in values):
        problems.add("label lines with NaN or infinite values", file, lineno)
        return None
    if not values[0].is_integer() or int(values[0]) not in names:
        problems.add("labels with a class not in names", file, lineno, f"class {fields[0]}, {len(names)} names")
        return None
    if len(fields) == 5:
        cx, cy, w, h = values[1:]
        x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    else:  # a polygon: its bounding box
        xs, ys = values[1::2], values[2::2]
        x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
    if x1 <= x0 or y1 <= y0:
        problems.add("boxes with zero or negative size", file, lineno)
        return None
    cx0, cx1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    cy0, cy1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    if cx1 <= cx0 or cy1 <= cy0:
        problems.add("boxes entirely outside the image", file, lineno)
        return None
    if max(cx0 - x0, cy0 - y0, x1 - cx1, y1 - cy1) > CLIP_TOLERANCE:
        problems.add("boxes reaching outside the image (clipped)", file, lineno)
    return int(values[0]), [cx0, cy0, cx1 - cx0, cy1 - cy0]


def write_yolo_split(
    coco: dict[str, Any], images_dir: Path, out: Path, split: str, index_of: dict[int, int], link: bool = False
) -> None:
    """Write one COCO-style split as ``out/images/<split>/...`` and ``out/labels/<split>/....txt``.  ``index_of``:
    category id -> YOLO class. Every annotation is written (filter crowd and invalid boxes before); every image
    gets a label file, empty without objects."""
    by_image: dict[int, list[str]] = {img["id"]: [] for img in coco["images"]}
    sizes = {img["id"]: (img["width"], img["height"]) for img in coco["images"]}
    for ann in coco["annotations"]:
        w_img, h_img = sizes[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        values = ((x + w / 2) / w_img, (y + h / 2) / h_img, w / w_img, h / h_img)
        by_image[ann["image_id"]].append(f"{index_of[ann['category_id']]} " + " ".join(_fmt(v) for v in values))
    written: set[Path] = set()
    for img in coco["images"]:
        rel = Path(img["file_name"])
        label = out / "labels" / split / rel.with_suffix(".txt")
        if label in written:
            raise DecodetError(f"two images share the label file {label.name} (same name, other suffix)", rel)
        written.add(label)
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("".join(line + "\n" for line in by_image[img["id"]]), encoding="utf-8")
        copy_image(images_dir / rel, out / "images" / split / rel, link)


def copy_image(src: Path, dst: Path, link: bool) -> None:
    """Copy ``src`` to ``dst`` (a hard link with ``link`` where the file system allows it)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not src.is_file():
        raise DecodetError("image file not found", src)
    if link:
        with contextlib.suppress(OSError):
            return os.link(src, dst)
    shutil.copy2(src, dst)


def write_data_yaml(out: Path, splits: list[str], names: list[str]) -> None:
    """``out/data.yaml`` naming ``images/<split>`` folders, without ``path`` (module docstring: root = its folder)."""
    content = {**{s: f"images/{s}" for s in splits}, "names": dict(enumerate(names))}
    header = (
        "# YOLO dataset written by decodet data convert\n"
        "# no 'path' key: the dataset root is this file's folder, wherever a command runs from\n"
    )
    (out / "data.yaml").write_text(header + yaml.safe_dump(content, sort_keys=False), encoding="utf-8")


def _fmt(value: float) -> str:
    text = f"{value:.{DECIMALS}f}".rstrip("0")
    return text + "0" if text.endswith(".") else text
