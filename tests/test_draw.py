"""Drawing detections: same size out, pixels change on the boxes only, atomic saving."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from decodet.errors import DecodetError
from decodet.inference.draw import class_color, class_name, draw_detections, save_image_atomic

DETS = {
    "boxes": torch.tensor([[10.0, 20.0, 120.0, 100.0], [150.0, 40.0, 400.0, 300.0], [5.0, 200.0, 60.0, 260.0]]),
    "scores": torch.tensor([0.9, 0.6, 0.1]),
    "labels": torch.tensor([1, 18, 3]),
}


def changed(before: Image.Image, after: Image.Image) -> np.ndarray:
    return (np.asarray(before.convert("RGB")) != np.asarray(after)).any(axis=-1)


def test_draw_changes_box_outlines_only():
    img = Image.new("RGB", (320, 240), (40, 60, 80))
    out = draw_detections(img, DETS, class_names={1: "person", 18: "dog"})
    assert out.size == img.size and out.mode == "RGB"
    diff = changed(img, out)
    assert diff[20, 10:121].all() and diff[20:101, 10].all()  # top and left edges of box 1
    assert diff[40, 150:320].all()  # box 2 is clipped to the image and still drawn
    assert diff[200:261, 5].sum() == 0  # below the score threshold: not drawn
    assert not diff[50:95, 30:110].any()  # inside box 1, away from its edges and label
    assert not diff[150:190, 60:100].any()  # outside every drawn box
    assert not diff[:15].any() and img.getpixel((0, 0)) == (40, 60, 80)  # input untouched
    assert diff[22:32, 12:40].any()  # the label tag


def test_draw_accepts_tensors_and_arrays():
    chw = torch.full((3, 240, 320), 100, dtype=torch.uint8)
    from_tensor = draw_detections(chw, DETS)
    from_gray = draw_detections(chw[:1], DETS)
    from_array = draw_detections(chw.permute(1, 2, 0).numpy(), DETS)
    assert from_tensor.size == from_gray.size == from_array.size == (320, 240)
    np.testing.assert_array_equal(np.asarray(from_tensor), np.asarray(from_array))
    np.testing.assert_array_equal(np.asarray(from_tensor), np.asarray(from_gray))
    assert (chw == 100).all()  # input untouched
    with pytest.raises(TypeError):
        draw_detections(chw.float() / 255, DETS)


def test_draw_nothing_above_threshold():
    img = Image.new("RGB", (64, 48), (1, 2, 3))
    out = draw_detections(img, {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)})
    assert np.array_equal(np.asarray(out), np.asarray(img))
    out = draw_detections(img, DETS, score_threshold=0.95)
    assert np.array_equal(np.asarray(out), np.asarray(img))


def test_draw_rejects_xywh_like_boxes():
    with pytest.raises(ValueError, match="xyxy"):
        draw_detections(Image.new("RGB", (64, 48)), {"boxes": [[30, 30, 5, 5]], "scores": [0.9], "labels": [0]})


def test_names_and_colors():
    assert class_name(["bg", "cat"], 1) == "cat" and class_name(["bg"], 5) == "5" and class_name(None, 2) == "2"
    assert class_name({3: "car"}, 3) == "car" and class_name({3: "car"}, 4) == "4"
    colors = [class_color(i) for i in range(91)]
    assert len(set(colors)) == 91 and all(0 <= c <= 255 for rgb in colors for c in rgb)


def test_save_image_atomic(tmp_path):
    img = draw_detections(Image.new("RGBA", (64, 48)), {"boxes": [[2, 2, 30, 30]], "scores": [0.9], "labels": [1]})
    for name in ("out.png", "sub/out.jpg"):
        path = save_image_atomic(img, tmp_path / name)
        with Image.open(path) as loaded:
            assert loaded.size == (64, 48)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["out.jpg", "out.png"]
    with pytest.raises(DecodetError, match="unknown image format"):
        save_image_atomic(img, tmp_path / "out.xyz")
