"""Pascal VOC datasets read as COCO-style splits.

Layout (the folder itself, or its only sub-folder holding it, e.g. ``VOCdevkit/VOC2012``)::

    Annotations/<id>.xml         size, and one <object> per box: name, difficult, bndbox xmin ymin xmax ymax
    JPEGImages/<id>.jpg
    ImageSets/Main/<split>.txt   one image id per line; every file without '_' is a split
                                 (train, val, trainval, test); <class>_<split>.txt files are ignored

The class list is every object name found in the split files' annotations, sorted; class ``i`` of
that list is COCO category id ``i + 1``. ``difficult`` boxes become crowd annotations
(``iscrowd=1``): left out of training, ignored regions in COCO evaluation, as in the VOC protocol.
VOC corners are 1-based inclusive pixel indices: ``[xmin, ymin, xmax, ymax]`` becomes the COCO box
``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]``. A missing ``<size>`` is read from the
image header.

Fatal (:class:`DecodetError`): no ``ImageSets/Main`` split file, a split file that cannot be
read, no object in any annotation. Counted, skipped and listed by ``decodet data check``:
missing or malformed XML files and missing images (the image is skipped), objects without a
name or with a bad box (the box is skipped).
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from decodet.data.converted import IMAGE_SUFFIXES, CocoBuilder, ConvertedDataset, image_size
from decodet.data.problems import Problems
from decodet.errors import DecodetError

logger = logging.getLogger(__name__)


def find_voc_root(folder: Path) -> Path | None:
    """``folder`` or its only sub-folder in the VOC layout; None when neither is."""
    if _is_voc(folder):
        return folder
    children = [c for c in sorted(folder.iterdir()) if c.is_dir() and _is_voc(c)]
    if len(children) > 1:
        names = ", ".join(c.name for c in children)
        raise DecodetError(f"several VOC datasets here ({names}): pass one of them", folder)
    return children[0] if children else None


def _is_voc(folder: Path) -> bool:
    return (folder / "Annotations").is_dir() and (folder / "ImageSets" / "Main").is_dir()


def read_voc(root: Path) -> ConvertedDataset:
    """Read the VOC dataset at ``root`` (see :func:`find_voc_root`) into COCO-style splits."""
    problems = Problems()
    split_files = sorted(p for p in (root / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
    if not split_files:
        raise DecodetError("no split file (ImageSets/Main/train.txt, val.txt, ...)", root / "ImageSets" / "Main")
    split_ids = {f.stem: _read_ids(f) for f in split_files}
    parsed: dict[str, dict[str, Any] | None] = {}
    for ids in split_ids.values():
        for image_id in ids:
            if image_id not in parsed:
                parsed[image_id] = _read_xml(root, image_id, problems)
    names = sorted({obj["name"] for rec in parsed.values() if rec for obj in rec["objects"]})
    if not names:
        raise DecodetError("no object in any annotation file: no classes to detect", root / "Annotations")
    category_of = {name: i + 1 for i, name in enumerate(names)}
    categories = [{"id": category_of[n], "name": n} for n in names]

    dataset = ConvertedDataset("voc", root, root, problems=problems)
    images_dir = root / "JPEGImages"
    for split, ids in split_ids.items():
        builder = CocoBuilder(categories)
        for image_id in ids:
            rec = parsed[image_id]
            if rec is None:
                continue
            coco_id = builder.add_image(rec["file_name"], rec["width"], rec["height"])
            for obj in rec["objects"]:
                builder.add_box(coco_id, category_of[obj["name"]], obj["bbox"], iscrowd=obj["difficult"])
        dataset.splits[split] = (images_dir, builder.to_dict(f"Pascal VOC dataset {root}, {split} split"))
    problems.log(logger, root)
    return dataset


def _read_ids(split_file: Path) -> list[str]:
    try:
        lines = split_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DecodetError(f"cannot read split file: {e}", split_file) from None
    return list(dict.fromkeys(line.split()[0] for line in lines if line.strip()))


def _read_xml(root: Path, image_id: str, problems: Problems) -> dict[str, Any] | None:
    """``{file_name, width, height, objects: [{name, difficult, bbox}]}``, or None (problem recorded)."""
    xml_file = root / "Annotations" / f"{image_id}.xml"
    try:
        tree = ET.parse(xml_file)
    except FileNotFoundError:
        problems.add("missing annotation files (image skipped)", xml_file)
        return None
    except ET.ParseError as e:
        line = e.position[0] if getattr(e, "position", None) else None
        problems.add("malformed XML files (image skipped)", xml_file, line, str(e))
        return None
    except OSError as e:
        problems.add("unreadable annotation files (image skipped)", xml_file, detail=str(e))
        return None
    node = tree.getroot()
    file_name = (node.findtext("filename") or "").strip()
    image = _find_image(root / "JPEGImages", file_name, image_id)
    if image is None:
        problems.add("missing images", xml_file, detail=f"JPEGImages/{file_name or image_id + '.jpg'}")
        return None
    width, height = _int(node.findtext("size/width")), _int(node.findtext("size/height"))
    if not width or not height or width <= 0 or height <= 0:
        try:
            width, height = image_size(image)
        except OSError as e:
            problems.add("unreadable images", image, detail=str(e))
            return None
    objects = []
    for k, obj in enumerate(node.iter("object"), 1):
        name = (obj.findtext("name") or "").strip()
        if not name:
            problems.add("objects without a name", xml_file, detail=f"object {k}")
            continue
        try:
            corners = [float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            problems.add("objects without a numeric bndbox", xml_file, detail=f"object {k}, {name}")
            continue
        xmin, ymin, xmax, ymax = corners
        if not all(math.isfinite(v) for v in corners) or xmax < xmin or ymax < ymin:
            problems.add("objects with an empty or inverted box", xml_file, detail=f"object {k}, {name}")
            continue
        difficult = 1 if _int(obj.findtext("difficult")) else 0
        bbox = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]
        objects.append({"name": name, "difficult": difficult, "bbox": bbox})
    return {"file_name": image.name, "width": width, "height": height, "objects": objects}


def _find_image(folder: Path, file_name: str, image_id: str) -> Path | None:
    if file_name and (folder / file_name).is_file():
        return folder / file_name
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / f"{image_id}{suffix}", folder / f"{image_id}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def _int(text: str | None) -> int | None:
    try:
        return int(float(text)) if text is not None else None
    except ValueError:
        return None
