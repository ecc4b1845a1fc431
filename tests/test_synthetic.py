"""The bundled synthetic dataset: deterministic, valid COCO, usable through the data package."""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from decodet.data import CocoDetection, build_transforms, generate_synthetic, resolve_data
from decodet.data.synthetic import CLASSES, MIN_VISIBLE, render_image
from decodet.errors import DecodetError


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("synth"), train=16, val=4, image_size=96, seed=3)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic(synth, tmp_path):
    again = generate_synthetic(tmp_path / "again", train=16, val=4, image_size=96, seed=3)
    assert _files(again) == _files(synth)
    other = generate_synthetic(tmp_path / "other", train=16, val=4, image_size=96, seed=4)
    assert _files(other)["train/000001.jpg"] != _files(synth)["train/000001.jpg"]
    # image i depends only on (seed, split, i): a larger dataset starts with the same images
    more = generate_synthetic(tmp_path / "more", train=20, val=0, image_size=96, seed=3)
    assert _files(more)["train/000016.jpg"] == _files(synth)["train/000016.jpg"]
    assert not (more / "val").exists()


def test_layout_and_pycocotools(synth):
    assert (synth / "data.yaml").is_file()
    for split, n in (("train", 16), ("val", 4)):
        ann_file = synth / "annotations" / f"instances_{split}.json"
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(ann_file))
        assert len(coco.getImgIds()) == n and len(list((synth / split).glob("*.jpg"))) == n
        cats = coco.loadCats(coco.getCatIds())
        assert len(cats) >= 6 and len({c["name"] for c in cats}) == len(cats)
        ids = sorted(c["id"] for c in cats)
        assert ids != list(range(ids[0], ids[0] + len(ids))), "category ids must not be contiguous"
        for img_id in coco.getImgIds():
            img = coco.loadImgs(img_id)[0]
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
            assert 1 <= len(anns) <= 12
            for a in anns:
                x, y, w, h = a["bbox"]
                assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
                assert w >= 1 and h >= 1 and a["iscrowd"] == 0 and a["category_id"] in ids
                assert 0 < a["area"] <= w * h
        ann_ids = [a["id"] for a in json.loads(ann_file.read_text())["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids)


def test_object_statistics():
    """Over many images: all classes appear, 1..12 objects, sizes from small to half the image."""
    S = 128
    counts, classes, sides = [], Counter(), []
    for i in range(60):
        _, objects = render_image(S, np.random.default_rng([0, 0, i]))
        counts.append(len(objects))
        classes.update(o["category_id"] for o in objects)
        sides += [max(o["bbox"][2:]) for o in objects]
    assert min(counts) >= 1 and max(counts) <= 12 and max(counts) >= 8
    assert set(classes) == {c[0] for c in CLASSES}
    assert min(sides) <= 0.08 * S and max(sides) >= 0.4 * S


def test_boxes_are_tight_and_objects_mostly_visible():
    """The box is the full extent of the object's pixels (occluded ones too); each keeps >= half visible."""
    overlaps = 0
    for i in range(20):
        image, objects = render_image(96, np.random.default_rng([1, 0, i]), with_masks=True)
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        for o in objects:
            ys, xs = np.nonzero(o["mask"])
            x, y, w, h = o["bbox"]
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert o["area"] == o["visible"].sum() >= MIN_VISIBLE * o["mask"].sum()
            assert not (o["visible"] & ~o["mask"]).any()
            overlaps += int(o["visible"].sum() < o["mask"].sum())
    assert MIN_VISIBLE >= 0.3 and overlaps > 0, "occlusion should occur"


def test_loads_through_the_data_package(synth):
    spec = resolve_data(synth)
    assert set(spec.splits) == {"train", "val"}
    ds = CocoDetection.from_split(spec.split("train"), transforms=build_transforms("light", True, 64))
    assert ds.category_ids == sorted(c[0] for c in CLASSES) and ds.class_names[0] == "circle"
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and len(target["boxes"]) == len(target["labels"])
    assert target["labels"].max() < ds.num_classes


def test_refuses_to_overwrite(synth, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(DecodetError, match="not empty"):
        generate_synthetic(tmp_path, train=2, val=1, image_size=64)
    out = generate_synthetic(tmp_path, train=2, val=1, image_size=64, overwrite=True, image_format="png")
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "train").iterdir()) == ["000001.png", "000002.png"]
    with pytest.raises(DecodetError, match="image_format"):
        generate_synthetic(tmp_path / "x", image_format="gif")
