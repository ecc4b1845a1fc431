"""COCO-format dataset parsing, label mapping, image decoding and dataset locations."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision import tv_tensors

from decodet.data import CocoDetection, load_image, parse_coco, resolve_data, to_rgb
from decodet.data.images import BACKGROUND_GREY
from decodet.errors import DecodetError

# ----------------------------------------------------------------------------- helpers


def _coco(images=None, annotations=None, categories=None) -> dict:
    return {
        "images": images if images is not None else [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": annotations if annotations is not None else [],
        "categories": categories if categories is not None else [{"id": 1, "name": "thing"}],
    }


def _write_dataset(root: Path, content: dict, name: str = "instances_val.json") -> tuple[Path, Path]:
    """Write ``content`` as an annotation file and a solid image for each of its images."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for img in content.get("images", []):
        if isinstance(img, dict) and "file_name" in img and "width" in img:
            Image.new("RGB", (img["width"], img["height"]), (200, 30, 30)).save(images_dir / img["file_name"])
    ann_file = root / name
    ann_file.write_text(json.dumps(content))
    return images_dir, ann_file


def _ann(id, image_id=1, category_id=1, bbox=(5, 5, 10, 10), **extra) -> dict:
    return {"id": id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox), **extra}


# ----------------------------------------------------------------------------- dataset


def test_label_mapping_and_target(tmp_path):
    content = _coco(
        images=[
            {"id": 7, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 9, "file_name": "b.png", "width": 20, "height": 20},
        ],
        annotations=[_ann(1, 7, 12, (10, 5, 20, 15)), _ann(2, 7, 3, (0, 0, 4, 4)), _ann(3, 9, 5, (1, 1, 2, 2))],
        categories=[{"id": 12, "name": "twelve"}, {"id": 3, "name": "three"}, {"id": 5, "name": "five"}],
    )
    ds = CocoDetection(*_write_dataset(tmp_path, content))
    assert ds.category_ids == [3, 5, 12] and ds.class_names == ["three", "five", "twelve"]
    assert ds.num_classes == 3 and ds.label_of == {3: 0, 5: 1, 12: 2}
    assert len(ds) == 2 and ds.image_ids == [7, 9]

    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 30, 40)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
    assert target["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY and target["boxes"].canvas_size == (30, 40)
    torch.testing.assert_close(
        target["boxes"].as_subclass(torch.Tensor), torch.tensor([[10.0, 5, 30, 20], [0, 0, 4, 4]])
    )
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [2, 0]
    assert target["image_id"] == 7 and target["orig_size"].tolist() == [30, 40]
    # labels <-> category ids, both ways
    assert ds.to_category_ids(target["labels"]).tolist() == [12, 3]
    assert ds.to_labels(torch.tensor([12, 3, 5])).tolist() == [2, 0, 1]


def test_empty_images_kept_and_crowd_ignored(tmp_path):
    content = _coco(
        images=[
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
        ],
        annotations=[_ann(1, 1, bbox=(1, 1, 5, 5)), _ann(2, 1, bbox=(10, 10, 20, 10), iscrowd=1)],
    )
    ds = CocoDetection(*_write_dataset(tmp_path, content))
    assert len(ds) == 2
    _, target = ds[0]
    assert target["boxes"].shape == (1, 4) and ds.records[0].num_crowd == 1
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_image_size_mismatch_rescales_boxes(tmp_path):
    images_dir, ann_file = _write_dataset(tmp_path, _coco(annotations=[_ann(1, bbox=(4, 3, 8, 6))]))
    Image.new("RGB", (80, 60)).save(images_dir / "a.png")  # twice the annotated 40 x 30
    _, target = CocoDetection(images_dir, ann_file)[0]
    assert target["boxes"].tolist() == [[8.0, 6.0, 24.0, 18.0]] and target["orig_size"].tolist() == [30, 40]


def test_transforms_are_applied(tmp_path):
    ds = CocoDetection(*_write_dataset(tmp_path, _coco(annotations=[_ann(1)])), transforms=lambda i, t: (i[:, :2], t))
    image, _ = ds[0]
    assert image.shape == (3, 2, 40)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: "{not json", "malformed JSON at line 1"),
        (lambda c: [1, 2], "expected a JSON object"),
        (lambda c: {k: v for k, v in c.items() if k != "images"}, "'images' is missing"),
        (lambda c: {k: v for k, v in c.items() if k != "annotations"}, "'annotations' is missing"),
        (lambda c: {k: v for k, v in c.items() if k != "categories"}, "'categories' is missing"),
        (lambda c: {**c, "images": {"id": 1}}, "'images' is not a list"),
        (lambda c: {**c, "categories": []}, "'categories' is empty"),
        (lambda c: {**c, "images": c["images"] * 2}, "duplicate image id 1"),
        (lambda c: {**c, "categories": c["categories"] * 2}, "duplicate category id 1"),
        (lambda c: {**c, "images": [{"id": 1, "width": 4, "height": 4}]}, "has no 'file_name'"),
        (lambda c: {**c, "images": [{"id": 1, "file_name": "a.png", "width": 0, "height": 4}]}, "positive integer"),
        (lambda c: {**c, "images": [{"file_name": "a.png", "width": 4, "height": 4}]}, "no integer 'id'"),
        (lambda c: {**c, "categories": [{"name": "x"}]}, "categories[0] has no integer 'id'"),
    ],
)
def test_fatal_annotation_errors_name_the_file(tmp_path, mutate, message):
    content = mutate(_coco(annotations=[_ann(1)]))
    ann_file = tmp_path / "instances_bad.json"
    ann_file.write_text(content if isinstance(content, str) else json.dumps(content))
    (tmp_path / "images").mkdir()
    with pytest.raises(DecodetError, match=re.escape(message)) as info:
        CocoDetection(tmp_path / "images", ann_file)
    assert info.value.path == str(ann_file) and "instances_bad.json" in str(info.value)


def test_missing_annotation_file_and_image_folder(tmp_path):
    with pytest.raises(DecodetError, match="annotation file not found") as info:
        parse_coco(tmp_path / "nope.json")
    assert info.value.path == str(tmp_path / "nope.json")
    images_dir, ann_file = _write_dataset(tmp_path, _coco())
    with pytest.raises(DecodetError, match="image folder not found"):
        CocoDetection(tmp_path / "missing", ann_file)


def test_bad_annotations_are_dropped_and_counted(tmp_path, caplog):
    annotations = [
        _ann(1, bbox=(1, 1, 5, 5)),  # good
        _ann(2, image_id=99),  # unknown image
        _ann(3, category_id=42),  # unknown category
        _ann(4, category_id=43),  # unknown category
        _ann(5, bbox=(1, 1, 0, 5)),  # zero width
        _ann(6, bbox=(1, 1, 5, -2)),  # negative height
        _ann(7, bbox=(float("nan"), 1, 5, 5)),  # NaN
        _ann(8, bbox=(1, 1, 5)),  # three numbers
        {"id": 9, "image_id": 1, "category_id": 1},  # no bbox
        _ann(10, bbox=(50, 1, 5, 5)),  # entirely right of the 40 px wide image
        _ann(11, bbox=(30, 20, 20, 20)),  # reaches outside: clipped to (30, 20, 40, 30)
        _ann(12, bbox=(-3, 2, 8, 4)),  # reaches outside: clipped to (0, 2, 5, 6)
        _ann(13, bbox=(0, 0, 40.4, 30.3)),  # sub-pixel overshoot: clipped silently
        "junk",
    ]
    images_dir, ann_file = _write_dataset(tmp_path, _coco(annotations=annotations))
    with caplog.at_level(logging.WARNING, logger="decodet.data.coco"):
        ds = CocoDetection(images_dir, ann_file)
    records = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(records) == 1, "one summary line per file"
    msg = records[0].getMessage()
    assert "instances_val.json" in msg
    for part in (
        "1 annotations with unknown image",
        "2 annotations with unknown category",
        "2 boxes with zero or negative size",
        "1 boxes with NaN or infinite values",
        "2 annotations without a 4-number bbox",
        "1 boxes entirely outside the image",
        "1 malformed annotation entries",
        "clipped 2 boxes",
    ):
        assert part in msg, (part, msg)
    boxes = ds.records[0].boxes.tolist()
    assert boxes == [[1, 1, 6, 6], [30, 20, 40, 30], [0, 2, 5, 6], [0, 0, 40, 30]]


def test_clean_file_logs_no_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        CocoDetection(*_write_dataset(tmp_path, _coco(annotations=[_ann(1)])))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _write_bad_image(path: Path, kind: str) -> None:
    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "not-an-image":
        path.write_text("hello, I am a text file\n" * 10)


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("missing", "file not found"),
        ("zero-byte", "empty file"),
        ("truncated", "corrupt or truncated"),
        ("not-an-image", "not an image file"),
    ],
)
def test_bad_images_raise_naming_the_file(tmp_path, kind, reason):
    path = tmp_path / "bad.jpg"
    _write_bad_image(path, kind)
    with pytest.raises(DecodetError, match=f"cannot read image: {reason}") as info:
        load_image(path)
    assert info.value.path == str(path) and "bad.jpg" in str(info.value)

    content = _coco(images=[{"id": 1, "file_name": "bad.jpg", "width": 64, "height": 64}])
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(content))
    with pytest.raises(DecodetError, match="cannot read image") as info:
        CocoDetection(tmp_path, ann_file)[0]
    assert info.value.path == str(path)


def test_skip_bad_images_substitutes_next_good_sample(tmp_path, caplog):
    content = _coco(
        images=[
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
        ],
        annotations=[_ann(1, 1), _ann(2, 2)],
    )
    images_dir, ann_file = _write_dataset(tmp_path, content)
    (images_dir / "a.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        _, target = CocoDetection(images_dir, ann_file, skip_bad_images=True)[0]
    assert target["image_id"] == 2
    assert any("a.png" in r.getMessage() for r in caplog.records)
    (images_dir / "b.png").write_bytes(b"")
    with pytest.raises(DecodetError, match="no readable image"):
        CocoDetection(images_dir, ann_file, skip_bad_images=True)[0]


def test_decompression_bomb_guard(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (50, 40)).save(path)
    with pytest.raises(DecodetError, match="over the limit") as info:
        load_image(path, max_pixels=1000)
    assert info.value.path == str(path)
    assert load_image(path).size == (50, 40)


# ----------------------------------------------------------------------------- image modes


def _roundtrip(tmp_path: Path, img: Image.Image, name: str = "x.png") -> np.ndarray:
    path = tmp_path / name
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB"
    return np.asarray(out).astype(int)


def test_grey_and_one_bit(tmp_path):
    a = _roundtrip(tmp_path, Image.fromarray(np.array([[0, 100], [200, 255]], dtype=np.uint8)))
    assert a[..., 0].tolist() == [[0, 100], [200, 255]] and (a[..., 0] == a[..., 2]).all()
    b = _roundtrip(tmp_path, Image.new("1", (3, 2), 1), "b.png")
    assert (b == 255).all()


def test_rgba_and_la_composite_on_grey(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 255, 0)  # fully transparent
    a = _roundtrip(tmp_path, Image.fromarray(rgba))
    assert a[0, 0].tolist() == [255, 0, 0] and a[0, 1].tolist() == list(BACKGROUND_GREY)
    la = Image.fromarray(np.array([[[10, 255], [10, 0]]], dtype=np.uint8), mode="LA")
    b = _roundtrip(tmp_path, la, "la.png")
    assert b[0, 0].tolist() == [10, 10, 10] and b[0, 1].tolist() == list(BACKGROUND_GREY)


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    a = _roundtrip(tmp_path, p)
    assert a[0].tolist() == [[255, 0, 0], [0, 255, 0]]
    p.info["transparency"] = 0  # index 0 (red) transparent
    b = _roundtrip(tmp_path, p, "t.png")
    assert b[0].tolist() == [list(BACKGROUND_GREY), [0, 255, 0]]


def test_cmyk(tmp_path):
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red in CMYK
    a = _roundtrip(tmp_path, cmyk, "c.jpg")
    assert a[..., 0].min() > 200 and a[..., 1].max() < 60 and a[..., 2].max() < 60


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64], [32896, 65535]], dtype=np.uint16)  # 0, 64, 128, 255 in 8 bit
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    a = _roundtrip(tmp_path, img, "d.png")
    assert a[..., 0].tolist() == [[0, 64], [128, 255]]
    # 32-bit integers holding 16-bit data, and float images, scale too
    i32 = to_rgb(Image.fromarray(values.astype(np.int32)))
    assert np.asarray(i32)[..., 1].tolist() == [[0, 64], [128, 255]]
    f = to_rgb(Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)))
    assert np.asarray(f)[..., 2].tolist() == [[0, 128], [255, 64]]


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red
    stored[:, 20:] = (0, 0, 255)  # right half blue
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    out = np.asarray(load_image(path)).astype(int)
    assert out.shape == (40, 20, 3)
    expected = np.rot90(stored, k=-1).astype(int)  # clockwise: the left (red) half ends on top
    assert np.abs(out - expected).mean() < 8
    assert out[5, 10, 0] > 200 and out[35, 10, 2] > 200


# ----------------------------------------------------------------------------- dataset locations


def _coco_layout(root: Path, splits=("train2017", "val2017"), nested: bool = False) -> None:
    (root / "annotations").mkdir(parents=True)
    for split in splits:
        (root / "images" / split if nested else root / split).mkdir(parents=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(_coco()))


def test_resolve_coco_layout(tmp_path):
    _coco_layout(tmp_path)
    spec = resolve_data(tmp_path)
    assert set(spec.splits) == {"train2017", "val2017"}
    assert spec.split("val").images_dir == tmp_path / "val2017"
    assert spec.split("train2017").ann_file == tmp_path / "annotations" / "instances_train2017.json"
    assert spec.has_split("train") and not spec.has_split("test")
    with pytest.raises(DecodetError, match="no 'test' split .*train2017, val2017"):
        spec.split("test")


def test_resolve_other_split_names_and_nested_images(tmp_path):
    _coco_layout(tmp_path, splits=("train", "foo2024"), nested=True)
    spec = resolve_data(str(tmp_path))
    assert spec.split("foo2024").images_dir == tmp_path / "images" / "foo2024"
    assert spec.split("train").images_dir == tmp_path / "images" / "train"


def test_resolve_annotation_without_images_is_reported(tmp_path):
    _coco_layout(tmp_path, splits=("val2017",))
    (tmp_path / "annotations" / "instances_train2017.json").write_text("{}")
    spec = resolve_data(tmp_path)
    assert list(spec.splits) == ["val2017"]
    with pytest.raises(DecodetError, match="image folder .*train2017 not found"):
        spec.split("train")


def test_resolve_errors(tmp_path):
    with pytest.raises(DecodetError, match="dataset not found") as info:
        resolve_data(tmp_path / "nothing")
    assert info.value.path == str(tmp_path / "nothing")
    with pytest.raises(DecodetError, match="no dataset found"):
        resolve_data(tmp_path)


def _yaml_dataset(root: Path) -> dict:
    for split in ("train", "val"):
        (root / "imgs" / split).mkdir(parents=True)
    (root / "ann").mkdir()
    for split in ("train", "val"):
        (root / "ann" / f"{split}.json").write_text(json.dumps(_coco()))
    return {
        "path": ".",
        "names": ["thing"],
        "train": {"images": "imgs/train", "annotations": "ann/train.json"},
        "val": {"images": "imgs/val", "annotations": "ann/val.json"},
    }


@pytest.mark.parametrize("name", ["data.yaml", "data.json", "custom.yml"])
def test_resolve_dataset_file(tmp_path, name):
    root = tmp_path / "ds"
    content = _yaml_dataset(root)
    file = root / name
    file.write_text(json.dumps(content) if name.endswith(".json") else yaml.safe_dump(content))
    spec = resolve_data(file)
    assert spec.split("val") == resolve_data(file).splits["val"]
    assert spec.split("val").images_dir == root / "imgs" / "val"
    assert spec.split("train").ann_file == root / "ann" / "train.json"
    if name.startswith("data."):  # a folder holding data.yaml / data.json resolves through it
        assert resolve_data(root).split("train") == spec.split("train")


def test_dataset_file_root_is_relative_to_the_file(tmp_path):
    content = _yaml_dataset(tmp_path / "elsewhere")
    content["path"] = "../elsewhere"
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "d.yaml").write_text(yaml.safe_dump(content))
    spec = resolve_data(tmp_path / "cfg" / "d.yaml")
    assert spec.split("train").images_dir.resolve() == (tmp_path / "elsewhere" / "imgs" / "train").resolve()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: {**c, "val": {"images": "imgs/nope", "annotations": "ann/val.json"}}, "image folder not found"),
        (lambda c: {**c, "val": {"images": "imgs/val", "annotations": "ann/nope.json"}}, "annotation file not found"),
        (lambda c: {**c, "val": {"images": "imgs/val"}}, "needs both 'images' and 'annotations'"),
        (lambda c: {**c, "train": "images/train"}, "use one form for every split"),
        (lambda c: {"names": ["a"]}, "names no split"),
    ],
)
def test_dataset_file_errors(tmp_path, edit, message):
    content = edit(_yaml_dataset(tmp_path))
    file = tmp_path / "data.yaml"
    file.write_text(yaml.safe_dump(content))
    with pytest.raises(DecodetError, match=message) as info:
        resolve_data(file)
    assert info.value.path == str(file)


def test_dataset_file_malformed_or_coco_json(tmp_path):
    bad = tmp_path / "data.yaml"
    bad.write_text("train: {images: [unclosed\n")
    with pytest.raises(DecodetError, match="malformed YAML at line") as info:
        resolve_data(bad)
    assert info.value.path == str(bad)
    coco = tmp_path / "instances_val.json"
    coco.write_text(json.dumps(_coco()))
    with pytest.raises(DecodetError, match="COCO annotation file, not a dataset file"):
        resolve_data(coco)
