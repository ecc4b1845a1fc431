"""Dataset cases that used to pass silently: no ``val`` split (training without evaluation), YOLO label
files without an image (orphans); and ``data.yaml`` files that ultralytics reads from any working directory."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from decodet.cli import main
from decodet.data import parse_coco, resolve_data

pytestmark = pytest.mark.usefixtures("cache_in_tmp")  # synth: tests/conftest.py
ORPHAN = "label files without an image"
NO_EVAL = "training runs without evaluation"


def _image(path: Path, size: tuple[int, int] = (32, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path)


def _label(path: Path, text: str = "0 0.5 0.5 0.5 0.5\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _yolo(root: Path, val: bool = True) -> Path:
    """images/train (a.jpg, sub/b.png, C.JPG) with labels; val as a .txt list of images/val/d.jpg."""
    for rel in ("train/a.jpg", "train/sub/b.png", "train/C.JPG", "val/d.jpg"):
        _image(root / "images" / rel)
        _label(root / "labels" / Path(rel).with_suffix(".txt"))
    (root / "val.txt").write_text("images/val/d.jpg\n")
    (root / "data.yaml").write_text("train: images/train\n" + ("val: val.txt\n" if val else "") + "names: [cat]\n")
    return root


def _check(data: Path, tmp_path: Path, capsys, status: int) -> str:
    capsys.readouterr()
    assert main(["data", "check", str(data), "--plot", str(tmp_path / "h.png")]) == status
    return capsys.readouterr().out


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ----------------------------------------------------------------------------- orphan labels


def test_yolo_orphan_labels_are_counted_and_the_first_named_in_one_warning(tmp_path, caplog, capsys):
    root = _yolo(tmp_path / "y")
    orphans = [root / "labels/train/gone1.txt", root / "labels/train/sub/gone2.txt", root / "labels/val/gone3.txt"]
    for label in orphans:
        _label(label)
    with caplog.at_level(logging.WARNING):
        spec = resolve_data(root)
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings  # one line for the dataset, not one per file
    assert f"skipped 3 {ORPHAN} (first: {min(orphans)})" in warnings[0]
    assert warnings[0].startswith(f"{root / 'data.yaml'}: ")
    # the labelled images are all read (C.JPG's label is not an orphan), the orphans change nothing
    assert {r.file_name for r in parse_coco(spec.split("train").ann_file).images} == {"a.jpg", "sub/b.png", "C.JPG"}

    out = _check(root, tmp_path, capsys, status=1)
    assert f"problems: 3 (3 {ORPHAN})" in out
    for label in orphans:
        assert f"  {label}: {ORPHAN}" in out
    assert "warning:" not in out  # it has a val split


def test_orphans_are_named_beside_other_problems(tmp_path, caplog):
    root = _yolo(tmp_path / "y")
    _label(root / "labels/train/a.txt", "0 0.5 0.5 0.2\n")  # a bad line comes first in the list
    _label(root / "labels/train/zz.txt")
    with caplog.at_level(logging.WARNING):
        resolve_data(root)
    (warning,) = _warnings(caplog)
    assert f"1 {ORPHAN} (first: {root / 'labels/train/zz.txt'})" in warning
    assert f"1 label lines with a wrong number of fields (first: {root / 'labels/train/a.txt'}:1" in warning


def test_a_split_list_makes_no_orphan_of_labels_whose_image_it_does_not_list(tmp_path, caplog):
    root = _yolo(tmp_path / "y")
    _image(root / "images/val/e.jpg")  # not in val.txt, but beside its label: not an orphan
    _label(root / "labels/val/e.txt")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: ../val.txt\nnames: [cat]\n")
    with caplog.at_level(logging.WARNING):
        resolve_data(root / "data.yaml")
    assert _warnings(caplog) == []


def test_orphans_in_an_export_layout(tmp_path, caplog, capsys):
    """Roboflow-style exports: ``train/images``, ``train/labels``, named from a sub-folder (``../train/images``)."""
    root = tmp_path / "rf"
    for split in ("train", "valid"):
        _image(root / split / "images/a.jpg")
        _label(root / split / "labels/a.txt")
    _label(root / "valid/labels/old.txt")
    (root / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnames: [cat]\n")
    with caplog.at_level(logging.WARNING):
        resolve_data(root)
    assert _warnings(caplog) == [
        f"{root / 'data.yaml'}: skipped 1 {ORPHAN} (first: {root / 'valid/labels/old.txt'}); "
        "run `decodet data check` for the full list"
    ]


# ----------------------------------------------------------------------------- no val split


def _voc(root: Path) -> Path:
    _image(root / "JPEGImages/a.jpg")
    (root / "Annotations").mkdir(parents=True)
    (root / "Annotations/a.xml").write_text(
        "<annotation><filename>a.jpg</filename><size><width>32</width><height>32</height></size>"
        "<object><name>cat</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>20</xmax><ymax>20</ymax></bndbox>"
        "</object></annotation>"
    )
    (root / "ImageSets/Main").mkdir(parents=True)
    (root / "ImageSets/Main/train.txt").write_text("a\n")
    return root


def _coco(root: Path, synth: Path, as_file: bool) -> Path:
    """The synthetic set's train split only, as a COCO folder or a COCO-form data.yaml."""
    shutil.copytree(synth / "train", root / "train")
    (root / "annotations").mkdir()
    (root / "annotations/instances_train.json").write_bytes((synth / "annotations/instances_train.json").read_bytes())
    if not as_file:
        return root
    (root / "d.yaml").write_text("train:\n  images: train\n  annotations: annotations/instances_train.json\n")
    return root / "d.yaml"


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("voc", "no ImageSets/Main/val.txt"),
        ("yolo", "no 'val:' entry"),
        ("coco", "no annotations/instances_val.json with an image folder val/"),
        ("coco-file", "no 'val:' entry"),
    ],
)
def test_no_val_split_is_one_warning_in_data_check(tmp_path, synth, caplog, capsys, fmt, expected):
    if fmt == "voc":
        data = _voc(tmp_path / "voc")
    elif fmt == "yolo":
        data = _yolo(tmp_path / "y", val=False) / "data.yaml"
    else:
        data = _coco(tmp_path / "c", synth, as_file=fmt == "coco-file")
    line = f"{data}: no 'val' split ({expected}; splits: train): {NO_EVAL}"
    assert resolve_data(data).no_val_warning() == line
    with caplog.at_level(logging.WARNING):
        out = _check(data, tmp_path, capsys, status=0)  # a warning, not a problem of the files
    assert _warnings(caplog) == [line]
    assert f"warning: {line}" in out.splitlines()
    assert "1 splits" in out and "problems: none" in out


def test_an_unusable_val_split_says_why_evaluation_is_off(tmp_path, synth, capsys):
    data = _coco(tmp_path / "c", synth, as_file=False)
    (data / "annotations/instances_val.json").write_bytes((synth / "annotations/instances_val.json").read_bytes())
    warning = resolve_data(data).no_val_warning()
    assert warning.startswith(f"{data}: split 'val' is unusable (image folder {data / 'val'} not found")
    assert warning.endswith(NO_EVAL)
    out = _check(data, tmp_path, capsys, status=1)  # the unusable split itself is a problem
    assert f"warning: {warning}" in out and "unusable split 'val'" in out


def test_val2017_counts_as_val(tmp_path, synth, capsys):
    data = _coco(tmp_path / "c", synth, as_file=False)
    shutil.copytree(synth / "val", data / "val2017")
    (data / "annotations/instances_val2017.json").write_bytes((synth / "annotations/instances_val.json").read_bytes())
    assert resolve_data(data).no_val_warning() == ""
    assert "warning:" not in _check(data, tmp_path, capsys, status=0)


@pytest.mark.slow
def test_train_logs_both_warnings(tmp_path, caplog):
    from test_trainer import TINY

    root = _yolo(tmp_path / "y", val=False)
    _label(root / "labels/train/gone.txt")
    argv = ["train", "--model", "deco_tiny", "--data", str(root), "--imgsz", "64", "--epochs", "1", "--max-steps", "1"]
    argv += ["--batch-size", "2", "--workers", "0", "--threads", "1", "--project", str(tmp_path / "runs")]
    argv += [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()]
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    warnings = _warnings(caplog)
    data_yaml = root / "data.yaml"
    assert f"{data_yaml}: skipped 1 {ORPHAN} (first: {root / 'labels/train/gone.txt'})" in "\n".join(warnings)
    assert f"{data_yaml}: no 'val' split (no 'val:' entry; splits: train): {NO_EVAL}" in warnings


# ----------------------------------------------------------------------------- data.yaml without path


def _ultralytics_split_paths(data_yaml: str, datasets_dir: Path) -> dict[str, Path]:
    """Where ultralytics looks for each split of ``data_yaml`` (``check_det_dataset`` in ultralytics/data/utils.py).

    The root is ``path``, or without it the yaml file's own folder; a relative root that does not
    exist from the working directory is taken under the ``datasets_dir`` setting; splits are
    relative to the root (``../x`` falls back to ``x``).
    """
    data = yaml.safe_load(Path(data_yaml).read_text())
    root = Path(data.get("path") or Path(data_yaml).parent)
    if not root.exists() and not root.is_absolute():
        root = (datasets_dir / root).resolve()
    out = {}
    for k in ("train", "val", "test"):
        if data.get(k):
            x = (root / data[k]).resolve()
            if not x.exists() and data[k].startswith("../"):
                x = (root / data[k][3:]).resolve()
            out[k] = x
    return out


def _ultralytics_label(image: Path) -> Path:
    """ultralytics' ``img2label_paths``: the last ``/images/`` becomes ``/labels/``, the suffix ``.txt``."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(sb.join(str(image).rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt")


def test_converted_data_yaml_is_found_by_ultralytics_from_another_folder(tmp_path, synth, monkeypatch):
    out = tmp_path / "sets" / "y"
    assert main(["data", "convert", str(synth), str(out), "--to", "yolo"]) == 0
    content = yaml.safe_load((out / "data.yaml").read_text())
    assert "path" not in content and content["train"] == "images/train"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    datasets_dir = tmp_path / "ultralytics_datasets"  # empty: nothing may be found through it
    for arg in (str(out / "data.yaml"), os.path.relpath(out / "data.yaml")):  # absolute, and ../sets/y/data.yaml
        splits = _ultralytics_split_paths(arg, datasets_dir)
        assert set(splits) == {"train", "val"}
        for split, folder in splits.items():
            images = sorted(folder.iterdir())
            assert folder == (out / "images" / split).resolve() and len(images) == len(list((synth / split).iterdir()))
            assert all(_ultralytics_label(image).is_file() for image in images)
    # what the file used to hold, ``path: .``, is the working directory for ultralytics: not found from here
    (out / "data.yaml").write_text(yaml.safe_dump({"path": ".", **content}))
    assert not _ultralytics_split_paths(str(out / "data.yaml"), datasets_dir)["train"].exists()
    # decodet reads a file without path from anywhere too (and a relative path against the file's folder)
    (out / "data.yaml").write_text(yaml.safe_dump(content))
    spec = resolve_data(os.path.relpath(out))
    assert spec.format == "yolo" and spec.split("train").images_dir.resolve() == (out / "images/train").resolve()


def test_synthetic_data_yaml_has_no_path_and_resolves_from_anywhere(tmp_path, synth, monkeypatch):
    assert "path" not in yaml.safe_load((synth / "data.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    spec = resolve_data(os.path.relpath(synth / "data.yaml"))
    assert spec.format == "coco" and spec.split("val").images_dir.resolve() == (synth / "val").resolve()
