"""Dataset formats: YOLO and Pascal VOC read through ``--data``, ``decodet data convert`` and ``data check``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from decodet.cli import main
from decodet.data import parse_coco, resolve_data
from decodet.errors import DecodetError

pytestmark = pytest.mark.usefixtures("cache_in_tmp")  # synth: tests/conftest.py


def _image(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path)


def _boxes_by_file(data) -> dict[str, dict[str, list]]:
    """split -> file_name -> sorted [(class name, x, y, w, h, iscrowd)] read from the resolved COCO JSON."""
    spec = resolve_data(data)
    out = {}
    for name, split in spec.splits.items():
        coco = json.loads(split.ann_file.read_text())
        names = {c["id"]: c["name"] for c in coco["categories"]}
        files = {img["id"]: img["file_name"] for img in coco["images"]}
        out[name] = {f: [] for f in files.values()}
        for a in coco["annotations"]:
            out[name][files[a["image_id"]]].append((names[a["category_id"]], *a["bbox"], a.get("iscrowd", 0)))
        for boxes in out[name].values():
            boxes.sort()
    return out


def _assert_same_boxes(a, b, tol=1e-3) -> None:
    assert a.keys() == b.keys()
    for split in a:
        assert a[split].keys() == b[split].keys(), split
        for f in a[split]:
            ba, bb = a[split][f], b[split][f]
            assert [(x[0], x[5]) for x in ba] == [(x[0], x[5]) for x in bb], f
            np.testing.assert_allclose([x[1:5] for x in ba], [x[1:5] for x in bb], atol=tol, rtol=0)


# ----------------------------------------------------------------------------- YOLO


def _yolo(root: Path) -> Path:
    """A small YOLO dataset: names as a dict, nested image folders, a .txt image list for val."""
    _image(root / "images/train/a.jpg", (40, 30))
    _image(root / "images/train/sub/b.png", (20, 50))
    _image(root / "images/train/c.jpg", (10, 10))  # no label file: no objects
    _image(root / "images/val/d.jpg", (40, 40))
    (root / "labels/train/sub").mkdir(parents=True)
    (root / "labels/val").mkdir(parents=True)
    (root / "labels/train/a.txt").write_text("0 0.5 0.5 0.5 0.2\n\n1 0.25 0.75 0.1 0.1\n")
    (root / "labels/train/sub/b.txt").write_text("1 0.1 0.1 0.3 0.1 0.3 0.5\n")  # a polygon: its bounding box
    (root / "labels/val/d.txt").write_text("0 0.5 0.5 1 1\n")
    (root / "val.txt").write_text("images/val/d.jpg\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: val.txt\nnames:\n  0: cat\n  1: dog\n")
    return root


def test_yolo_is_read_as_coco(tmp_path):
    spec = resolve_data(_yolo(tmp_path / "y"))
    assert spec.format == "yolo" and set(spec.splits) == {"train", "val"}
    train = parse_coco(spec.split("train").ann_file)
    assert train.class_names == ["cat", "dog"] and train.category_ids == [0, 1]
    recs = {r.file_name: r for r in train.images}
    assert set(recs) == {"a.jpg", "c.jpg", "sub/b.png"}
    assert (recs["a.jpg"].width, recs["a.jpg"].height) == (40, 30)  # from the image header
    np.testing.assert_allclose(recs["a.jpg"].boxes, [[10, 12, 30, 18], [8, 21, 12, 24]], atol=1e-4)
    assert recs["a.jpg"].labels.tolist() == [0, 1]
    np.testing.assert_allclose(recs["sub/b.png"].boxes, [[2, 5, 6, 25]], atol=1e-4)
    assert len(recs["c.jpg"].boxes) == 0
    assert (spec.split("train").images_dir / "sub/b.png").is_file()
    val = parse_coco(spec.split("val").ann_file)
    np.testing.assert_allclose(val.images[0].boxes, [[0, 0, 40, 40]])


def test_yolo_names_as_list_and_data_yaml_path(tmp_path):
    root = _yolo(tmp_path / "y")
    (root / "data.yaml").write_text("train: images/train\nnames: [cat, dog]\n")
    spec = resolve_data(root / "data.yaml")
    assert spec.format == "yolo" and list(spec.splits) == ["train"]
    assert parse_coco(spec.split("train").ann_file).class_names == ["cat", "dog"]
    # exported layouts name splits relative to a sub-folder: train: ../images/train
    (root / "data.yaml").write_text("train: ../images/train\nval: ../val.txt\nnames: [cat, dog]\n")
    assert set(resolve_data(root).splits) == {"train", "val"}


def test_auto_detection(tmp_path, synth):
    assert resolve_data(synth).format == "coco"  # its data.yaml names COCO JSON files
    assert main(["data", "convert", str(synth), str(tmp_path / "c"), "--to", "coco"]) == 0
    assert not (tmp_path / "c" / "data.yaml").exists() and resolve_data(tmp_path / "c").format == "coco"
    assert resolve_data(_yolo(tmp_path / "y")).format == "yolo"
    voc = _voc_from_coco(synth, tmp_path / "VOCdevkit" / "VOC2007")
    assert resolve_data(voc).format == "voc"
    assert resolve_data(tmp_path / "VOCdevkit").format == "voc"  # the folder holding exactly one VOC set


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("0 0.5 0.5 0.2", "wrong number of fields"),
        ("2 0.5 0.5 0.2 0.2", "class not in names"),
        ("0 0.5 x 0.2 0.2", "non-numeric"),
        ("0 0.5 0.5 0 0.2", "zero or negative size"),
        ("0 1.5 1.5 0.2 0.2", "entirely outside"),
    ],
)
def test_yolo_bad_label_line_is_counted_skipped_and_located(tmp_path, caplog, capsys, line, kind):
    root = _yolo(tmp_path / "y")
    (root / "labels/train/a.txt").write_text(f"0 0.5 0.5 0.5 0.2\n{line}\n")
    with caplog.at_level(logging.WARNING):
        spec = resolve_data(root)
    assert kind in caplog.text and str(root / "labels/train/a.txt") in caplog.text
    recs = {r.file_name: r for r in parse_coco(spec.split("train").ann_file).images}
    assert len(recs["a.jpg"].boxes) == 1  # the good line is kept, the bad one skipped
    assert main(["data", "check", str(root), "--plot", str(tmp_path / "h.png")]) == 1
    out = capsys.readouterr().out
    assert f"{root / 'labels/train/a.txt'}:2: " in out and kind in out


def test_yolo_bad_yaml_and_missing_split_are_one_line_errors(tmp_path, capsys):
    root = _yolo(tmp_path / "y")
    (root / "data.yaml").write_text("train: images/train\nnames: [cat, dog\n")
    assert main(["train", "--model", "deco_tiny", "--data", str(root)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "data.yaml" in err and "malformed YAML" in err
    (root / "data.yaml").write_text("train: images/nowhere\nnames: [cat]\n")
    with pytest.raises(DecodetError, match="nowhere.*not found"):
        resolve_data(root)
    (root / "data.yaml").write_text("train: images/train\n")
    with pytest.raises(DecodetError, match="'names'"):
        resolve_data(root)


def test_yolo_missing_and_unreadable_images_are_skipped(tmp_path, capsys):
    root = _yolo(tmp_path / "y")
    (root / "val.txt").write_text("images/val/d.jpg\nimages/val/gone.jpg\n")
    (root / "images/train/c.jpg").write_bytes(b"not an image")
    spec = resolve_data(root)
    assert [r.file_name for r in parse_coco(spec.split("val").ann_file).images] == ["d.jpg"]
    assert "c.jpg" not in {r.file_name for r in parse_coco(spec.split("train").ann_file).images}
    assert main(["data", "check", str(root), "--plot", str(tmp_path / "h.png")]) == 1
    out = capsys.readouterr().out
    assert f"{root / 'val.txt'}:2: missing images" in out
    assert f"{root / 'images/train/c.jpg'}: unreadable images" in out


# ----------------------------------------------------------------------------- VOC


def _voc_xml(file_name: str, size: tuple[int, int] | None, objects: list[tuple[str, int, list[float]]]) -> str:
    parts = [f"<annotation><folder>VOC</folder><filename>{file_name}</filename>"]
    if size:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, difficult, (x0, y0, x1, y1) in objects:
        parts.append(
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>\n"


def _voc_from_coco(coco_root: Path, out: Path, difficult_every: int = 3) -> Path:
    """Write the COCO dataset at ``coco_root`` as Pascal VOC (every ``difficult_every``-th box difficult)."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        coco = json.loads((coco_root / f"annotations/instances_{split}.json").read_text())
        names = {c["id"]: c["name"] for c in coco["categories"]}
        ids = []
        for img in coco["images"]:
            stem = f"{split}_{Path(img['file_name']).stem}"
            ids.append(stem)
            (out / "JPEGImages" / f"{stem}.jpg").write_bytes((coco_root / split / img["file_name"]).read_bytes())
            objects = [
                (names[a["category_id"]], int(a["id"] % difficult_every == 0), _voc_corners(a["bbox"]))
                for a in coco["annotations"]
                if a["image_id"] == img["id"]
            ]
            xml = _voc_xml(f"{stem}.jpg", (img["width"], img["height"]), objects)
            (out / "Annotations" / f"{stem}.xml").write_text(xml)
        (out / "ImageSets/Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        (out / "ImageSets/Main" / f"circle_{split}.txt").write_text("ignored 1\n")  # a per-class list
    return out


def _voc_corners(bbox: list[float]) -> list[float]:
    x, y, w, h = bbox
    return [x + 1, y + 1, x + w, y + h]  # VOC: 1-based inclusive corners


def test_voc_is_read_as_coco(tmp_path):
    root = tmp_path / "voc"
    (root / "ImageSets/Main").mkdir(parents=True)
    _image(root / "JPEGImages/x1.jpg", (50, 40))
    _image(root / "JPEGImages/x2.png", (30, 30))
    (root / "Annotations").mkdir()
    objs = [("person", 0, [1, 1, 20, 10]), ("bird", 1, [11, 21, 30, 40])]
    (root / "Annotations/x1.xml").write_text(_voc_xml("x1.jpg", (50, 40), objs))
    (root / "Annotations/x2.xml").write_text(_voc_xml("", None, [("cat", 0, [5, 5, 10, 10])]))  # no size, no name
    (root / "ImageSets/Main/train.txt").write_text("x1\n")
    (root / "ImageSets/Main/val.txt").write_text("x2\n")
    spec = resolve_data(root)
    assert spec.format == "voc" and set(spec.splits) == {"train", "val"}
    train = parse_coco(spec.split("train").ann_file)
    assert train.class_names == ["bird", "cat", "person"]  # every split's names, sorted
    rec = train.images[0]
    np.testing.assert_allclose(rec.boxes, [[0, 0, 20, 10]])  # the difficult bird is a crowd box
    assert rec.labels.tolist() == [2] and rec.num_crowd == 1
    raw = json.loads(spec.split("train").ann_file.read_text())
    crowd = [a for a in raw["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1 and crowd[0]["bbox"] == [10, 20, 20, 20]  # still in the evaluation ground truth
    val = parse_coco(spec.split("val").ann_file).images[0]
    assert (val.file_name, val.width, val.height) == ("x2.png", 30, 30)  # size from the header


def test_voc_bad_xml_and_missing_image_are_skipped_and_located(tmp_path, synth, caplog, capsys):
    root = _voc_from_coco(synth, tmp_path / "voc")
    bad = root / "Annotations/train_000001.xml"
    bad.write_text("<annotation><filename>train_000001.jpg</filename><object></annotation>")
    (root / "JPEGImages/train_000002.jpg").unlink()
    with caplog.at_level(logging.WARNING):
        spec = resolve_data(root)
    assert "malformed XML" in caplog.text and "missing images" in caplog.text
    files = [r.file_name for r in parse_coco(spec.split("train").ann_file).images]
    assert files == ["train_000003.jpg", "train_000004.jpg"]
    assert main(["data", "check", str(root), "--plot", str(tmp_path / "h.png")]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:1: malformed XML files" in out
    assert f"{root / 'Annotations/train_000002.xml'}: missing images" in out


def test_voc_without_split_files_is_an_error(tmp_path, capsys):
    (tmp_path / "voc/Annotations").mkdir(parents=True)
    (tmp_path / "voc/ImageSets/Main").mkdir(parents=True)
    assert main(["data", "check", str(tmp_path / "voc")]) == 2
    assert "no split file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- convert


def test_convert_coco_to_yolo_to_coco_round_trip(tmp_path, synth):
    assert main(["data", "convert", str(synth), str(tmp_path / "y"), "--to", "yolo"]) == 0
    assert resolve_data(tmp_path / "y").format == "yolo"
    labels = (tmp_path / "y/labels/train/000001.txt").read_text().split()
    assert len(labels) % 5 == 0 and len(labels) > 0
    assert main(["data", "convert", str(tmp_path / "y"), str(tmp_path / "c"), "--to", "coco"]) == 0
    assert resolve_data(tmp_path / "c").format == "coco"
    _assert_same_boxes(_boxes_by_file(synth), _boxes_by_file(tmp_path / "c"))
    for split in ("train", "val"):  # the images themselves are copied unchanged
        for f in (synth / split).iterdir():
            assert (tmp_path / "c" / split / f.name).read_bytes() == f.read_bytes()


def test_convert_voc_to_coco_keeps_difficult_as_crowd(tmp_path, synth):
    voc = _voc_from_coco(synth, tmp_path / "voc")
    assert main(["data", "convert", str(voc), str(tmp_path / "c"), "--to", "coco"]) == 0
    got = _boxes_by_file(tmp_path / "c")
    want = _boxes_by_file(synth)
    # the same boxes and classes, with every third annotation id marked difficult -> crowd
    for split in want:
        coco = json.loads((synth / f"annotations/instances_{split}.json").read_text())
        names = {c["id"]: c["name"] for c in coco["categories"]}
        files = {img["id"]: f"{split}_{Path(img['file_name']).stem}.jpg" for img in coco["images"]}
        want[split] = {files[i]: [] for i in files}
        for a in coco["annotations"]:
            want[split][files[a["image_id"]]].append((names[a["category_id"]], *a["bbox"], int(a["id"] % 3 == 0)))
        for boxes in want[split].values():
            boxes.sort()
    _assert_same_boxes(want, got)
    assert any(b[5] for boxes in got["train"].values() for b in boxes)


def test_convert_to_yolo_leaves_out_crowd_boxes_and_says_so(tmp_path, synth, capsys):
    voc = _voc_from_coco(synth, tmp_path / "voc")
    assert main(["data", "convert", str(voc), str(tmp_path / "y"), "--to", "yolo"]) == 0
    out = capsys.readouterr().out
    crowd = sum(b[5] for split in _boxes_by_file(voc).values() for boxes in split.values() for b in boxes)
    assert f"left out {crowd} crowd / difficult boxes" in out and crowd > 0
    assert sum(len(boxes) for split in _boxes_by_file(tmp_path / "y").values() for boxes in split.values()) == sum(
        len(boxes) - sum(b[5] for b in boxes) for split in _boxes_by_file(voc).values() for boxes in split.values()
    )


def test_convert_refuses_a_non_empty_destination(tmp_path, synth, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["data", "convert", str(synth), str(tmp_path / "out"), "--to", "yolo"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- check


def test_check_summarises_and_plots(tmp_path, synth, capsys):
    png = tmp_path / "plots" / "check.png"
    assert main(["data", "check", str(synth), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    for split in ("train", "val"):
        coco = json.loads((synth / f"annotations/instances_{split}.json").read_text())
        n_img, n_box = len(coco["images"]), len(coco["annotations"])
        assert f"split {split}: {n_img} images, {n_box} boxes" in out
        areas = [a["bbox"][2] * a["bbox"][3] for a in coco["annotations"]]
        small, medium = sum(a < 32**2 for a in areas), sum(32**2 <= a < 96**2 for a in areas)
        assert f"box sizes: small {small}, medium {medium}, large {n_box - small - medium}" in out
    circles = [
        sum(
            a["category_id"] == 1
            for a in json.loads((synth / f"annotations/instances_{s}.json").read_text())["annotations"]
        )
        for s in ("train", "val")
    ]
    assert any(line.split() == ["circle", *map(str, circles)] for line in out.splitlines())
    assert "problems: none" in out
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 200


def test_check_lists_coco_problems_by_annotation_id(tmp_path, synth, capsys):
    data = tmp_path / "c"
    assert main(["data", "convert", str(synth), str(data), "--to", "coco"]) == 0
    ann_file = data / "annotations/instances_val.json"
    coco = json.loads(ann_file.read_text())
    coco["annotations"][0]["bbox"] = [1, 1, 0, 5]
    coco["annotations"][1]["category_id"] = 999
    ann_file.write_text(json.dumps(coco))
    capsys.readouterr()
    assert main(["data", "check", str(data), "--plot", str(tmp_path / "h.png")]) == 1
    out = capsys.readouterr().out
    first, second = coco["annotations"][0]["id"], coco["annotations"][1]["id"]
    assert f"{ann_file}: annotation {first}: boxes with zero or negative size" in out
    assert f"{ann_file}: annotation {second}: annotations with unknown category" in out


# ----------------------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["yolo", "voc"])
def test_train_two_steps_from_format(tmp_path, synth, fmt):
    import decodet

    if fmt == "yolo":
        data = tmp_path / "y"
        assert main(["data", "convert", str(synth), str(data), "--to", "yolo"]) == 0
    else:
        data = _voc_from_coco(synth, tmp_path / "voc")
    argv = ["train", "--model", "deco_tiny", "--data", str(data), "--imgsz", "96", "--epochs", "1", "--max-steps", "2"]
    argv += [
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--threads",
        "1",
        "--project",
        str(tmp_path / "runs"),
        "--name",
        "t",
    ]
    assert main(argv) == 0
    run = tmp_path / "runs" / "t"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("AP" in r or "val/AP" in r for r in records)
    names = decodet.load_model(run / "best.safetensors").config.class_names
    assert sorted(names) == sorted(parse_coco(synth / "annotations/instances_train.json").class_names)
