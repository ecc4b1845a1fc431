"""Where a dataset lives: ``resolve_data(path) -> DataSpec`` with one image folder + COCO JSON per split.

``path`` may be:

1. **A folder in the COCO layout**: every ``annotations/instances_<split>.json`` paired with an
   image folder ``<split>/`` (or ``images/<split>/``) is a split, whatever its name.
2. **A dataset file** (YAML or JSON) naming each split's image folder and annotation file;
   relative paths resolve against ``path``, itself relative to the file (absent: the file's folder)::

       path: .                 # optional dataset root (as YOLO files: see decodet.data.yolo)
       train: {images: train, annotations: annotations/instances_train.json}
       val: {images: val, annotations: annotations/instances_val.json}

   Other top-level keys (``names``, ``nc``...) are ignored: class names come from the annotation files.
3. **A folder holding such a file** as ``data.yaml`` (or ``data.yml`` / ``data.json``).
4. **A YOLO dataset** (ultralytics layout, :mod:`decodet.data.yolo`).
5. **A Pascal VOC folder**, or a folder holding exactly one (``VOCdevkit``): :mod:`decodet.data.voc`.

YOLO and VOC datasets are converted to ``instances_<split>.json`` in a cache folder (:mod:`decodet.data.converted`),
so every split is an image folder plus a COCO JSON whatever the format (``DataSpec.format`` says which).
``spec.split("train")`` also finds ``train2017`` / ``train2014`` when no split is called exactly ``train``
(likewise ``val``/``test``). Without a usable ``val`` split training runs without evaluation."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from decodet.data.converted import ConvertedDataset, dataset_root, under, write_cached_annotations
from decodet.data.problems import Problems
from decodet.data.voc import find_voc_root, read_voc
from decodet.data.yolo import is_yolo_file, read_yolo
from decodet.errors import DecodetError
from decodet.io.files import read_mapping

DATASET_FILES = ("data.yaml", "data.yml", "data.json")
_IMAGES_KEYS = ("images", "img_dir", "images_dir", "img_folder")
_ANNOTATIONS_KEYS = ("annotations", "ann_file", "annotation", "ann")
_ANN_PATTERN = re.compile(r"^instances_(?P<split>.+)\.json$")


@dataclass(frozen=True)
class SplitSpec:
    """One split: ``images_dir`` holds the files named by ``ann_file`` (COCO JSON)."""

    images_dir: Path
    ann_file: Path


@dataclass(frozen=True)
class DataSpec:
    """A resolved dataset.

    Attributes:
        source: the folder or dataset file it was resolved from (used in error messages).
        splits: split name -> :class:`SplitSpec`, for splits whose files all exist.
        missing: split name -> why it is unusable (e.g. annotation file without its image folder).
        problems: what was skipped converting a YOLO / VOC dataset (empty for COCO, checked when loaded)."""

    source: Path
    root: Path
    splits: dict[str, SplitSpec]
    missing: dict[str, str] = field(default_factory=dict)
    format: str = "coco"
    problems: Problems = field(default_factory=Problems)

    def split(self, name: str) -> SplitSpec:
        """The split called ``name`` (or ``name2017``/``name2014``); DecodetError if absent."""
        for candidate in _aliases(name):
            if candidate in self.splits:
                return self.splits[candidate]
        for candidate in _aliases(name):
            if candidate in self.missing:
                raise DecodetError(f"split {candidate!r} is unusable: {self.missing[candidate]}", self.source)
        have = ", ".join(sorted(self.splits)) or "none"
        raise DecodetError(f"dataset has no {name!r} split (splits found: {have})", self.source)

    def has_split(self, name: str) -> bool:
        """Whether :meth:`split` would succeed for ``name``."""
        return any(c in self.splits for c in _aliases(name))

    def no_val_warning(self, name: str = "val") -> str:
        """The one-line warning that training runs without evaluation, naming the file that would hold the
        split or why it is unusable; ``""`` with a ``name`` split."""
        if self.has_split(name):
            return ""
        consequence = "training runs without evaluation"
        for candidate in _aliases(name):
            if candidate in self.missing:
                return f"{self.source}: split {candidate!r} is unusable ({self.missing[candidate]}): {consequence}"
        if self.format == "voc":
            expected = f"no ImageSets/Main/{name}.txt"
        elif self.source.is_file():
            expected = f"no '{name}:' entry"
        else:
            expected = f"no annotations/instances_{name}.json with an image folder {name}/"
        have = ", ".join(sorted(self.splits)) or "none"
        return f"{self.source}: no {name!r} split ({expected}; splits: {have}): {consequence}"


def resolve_data(data: str | os.PathLike) -> DataSpec:
    """Resolve a dataset folder or file (module docstring) into a :class:`DataSpec`; :class:`DecodetError` if
    missing, malformed, naming absent files, or a folder with no recognisable dataset."""
    path = Path(data).expanduser()
    if not path.exists():
        raise DecodetError("dataset not found (no such file or folder)", path)
    if path.is_file():
        return _from_file(path)
    for name in DATASET_FILES:
        if (path / name).is_file():
            return _from_file(path / name)
    voc_root = find_voc_root(path)
    if voc_root is not None:
        return _from_converted(read_voc(voc_root))
    return _from_coco_layout(path)


def _from_converted(dataset: ConvertedDataset) -> DataSpec:
    ann_files = write_cached_annotations(dataset)
    splits = {name: SplitSpec(images_dir, ann_files[name]) for name, (images_dir, _) in dataset.splits.items()}
    return DataSpec(dataset.source, dataset.root, splits, format=dataset.format, problems=dataset.problems)


def _from_coco_layout(root: Path) -> DataSpec:
    ann_dir = root / "annotations"
    ann_files = sorted(ann_dir.glob("instances_*.json")) if ann_dir.is_dir() else []
    splits: dict[str, SplitSpec] = {}
    missing: dict[str, str] = {}
    for ann_file in ann_files:
        name = _ANN_PATTERN.match(ann_file.name).group("split")
        for images_dir in (root / name, root / "images" / name):
            if images_dir.is_dir():
                splits[name] = SplitSpec(images_dir, ann_file)
                break
        else:
            missing[name] = f"image folder {root / name} not found (for {ann_file})"
    if not splits and not missing:
        raise DecodetError(
            "no dataset found: expected annotations/instances_<split>.json next to image folders <split>/, "
            f"a dataset file ({', '.join(DATASET_FILES)}; COCO or YOLO), or a Pascal VOC folder",
            root,
        )
    return DataSpec(source=root, root=root, splits=splits, missing=missing)


def _from_file(file: Path) -> DataSpec:
    content = read_mapping(
        file, "dataset file", "dataset file must hold a mapping of split names to image folders and annotations"
    )
    if is_yolo_file(content):
        return _from_converted(read_yolo(file, content))
    if "images" in content and "annotations" in content:
        raise DecodetError(
            "this is a COCO annotation file, not a dataset file: pass the dataset folder or a data.yaml "
            "naming each split's images and annotations",
            file,
        )
    root = dataset_root(file, content)  # the YOLO reader's rule
    splits: dict[str, SplitSpec] = {}
    for name, value in content.items():
        if not isinstance(value, dict):
            continue  # path, names: [...]... (a split given as a path is YOLO, read above)
        images = _pick(value, _IMAGES_KEYS)
        annotations = _pick(value, _ANNOTATIONS_KEYS)
        if images is None or annotations is None:
            raise DecodetError(f"split {name!r} needs both 'images' and 'annotations' entries", file)
        split = SplitSpec(under(root, images), under(root, annotations))
        if not split.images_dir.is_dir():
            raise DecodetError(f"split {name!r}: image folder not found: {split.images_dir}", file)
        if not split.ann_file.is_file():
            raise DecodetError(f"split {name!r}: annotation file not found: {split.ann_file}", file)
        splits[str(name)] = split
    if not splits:
        raise DecodetError("dataset file names no split (expected e.g. 'train: {images: ..., annotations: ...}')", file)
    return DataSpec(source=file, root=root, splits=splits)


def _pick(mapping: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    return next((mapping[key] for key in keys if isinstance(mapping.get(key), str)), None)


def _aliases(name: str) -> tuple[str, str, str]:
    return name, f"{name}2017", f"{name}2014"
