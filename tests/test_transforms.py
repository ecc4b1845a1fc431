"""Augmentation recipes keep boxes on their pixels; collate pads and normalises."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from decodet.data import IMAGENET_MEAN, MultiScaleCollate, build_transforms, collate, multiscale_sizes
from decodet.data.transforms import RandomSizeCrop
from decodet.errors import DecodetError


def _sample(h: int, w: int, boxes: list[list[float]], labels: list[int] | None = None, value: int = 255):
    """Black uint8 image with each xyxy box filled bright, and its target."""
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    for x0, y0, x1, y1 in boxes:
        image[:, int(y0) : int(y1), int(x0) : int(x1)] = value
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(h, w)
        ),
        "labels": torch.tensor(labels if labels is not None else list(range(len(boxes))), dtype=torch.int64),
        "image_id": 5,
        "orig_size": torch.tensor([h, w]),
    }
    return tv_tensors.Image(image), target


def _check_inside(image: torch.Tensor, target: dict) -> None:
    h, w = image.shape[-2:]
    boxes = target["boxes"]
    assert boxes.canvas_size == (h, w)
    assert len(boxes) == len(target["labels"])
    if len(boxes):
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 1).all(), "degenerate boxes must be sanitised away"


@pytest.mark.parametrize("recipe", ["detr", "light", "rtdetr"])
@pytest.mark.parametrize("train", [True, False])
def test_box_follows_its_pixels(recipe, train):
    """One bright rectangle on black: after any transform, the box still encloses the bright pixels."""
    torch.manual_seed(0)
    tf = build_transforms(recipe, train=train, imgsz=128, normalize=False)
    for trial in range(25):
        image, target = _sample(96, 128, [[30 + trial, 20, 90, 60 + trial]], labels=[3])
        out, t = tf(image, target)
        assert out.dtype == torch.float32 and out.shape[0] == 3
        _check_inside(out, t)
        grey = out.mean(0)
        bright = grey > (grey.max() + grey.min()) / 2
        if len(t["boxes"]) == 0:  # cropped away: at most a sliver of the object may remain
            assert bright.sum() <= 2 * sum(out.shape[-2:])
            continue
        assert t["labels"].tolist() == [3] and t["image_id"] == 5
        x0, y0, x1, y1 = t["boxes"][0].tolist()
        ys, xs = torch.nonzero(bright, as_tuple=True)
        # all bright pixels inside the box (1.5 px slack for resampling blur) ...
        assert xs.min() >= x0 - 1.5 and xs.max() + 1 <= x1 + 1.5
        assert ys.min() >= y0 - 1.5 and ys.max() + 1 <= y1 + 1.5
        # ... and the box hugs them
        assert xs.min() <= x0 + 1.5 and xs.max() + 1 >= x1 - 1.5
        assert ys.min() <= y0 + 1.5 and ys.max() + 1 >= y1 - 1.5


@pytest.mark.parametrize("recipe", ["detr", "light", "rtdetr"])
def test_many_boxes_stay_inside_and_labels_follow(recipe):
    torch.manual_seed(1)
    tf = build_transforms(recipe, train=True, imgsz=96)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        xy = torch.rand(8, 2, generator=g) * torch.tensor([100.0, 70])
        wh = 2 + torch.rand(8, 2, generator=g) * 40
        boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([120.0, 80]))], 1)
        labels = torch.arange(8) * 10
        image, target = _sample(80, 120, boxes.tolist(), labels.tolist(), value=0)
        out, t = tf(image, target)
        _check_inside(out, t)
        kept = t["labels"].tolist()
        assert set(kept) <= set(labels.tolist()) and len(set(kept)) == len(kept)
        assert kept == sorted(kept), "surviving boxes keep their order and their labels"
        assert torch.isfinite(t["boxes"]).all()


def test_output_sizes_and_normalisation():
    image, target = _sample(60, 90, [[10, 10, 30, 30]])
    for recipe in ("light", "rtdetr"):
        out, _ = build_transforms(recipe, train=False, imgsz=64)(image, target)
        assert out.shape == (3, 64, 64)
        out, _ = build_transforms(recipe, train=True, imgsz=(48, 80))(image, target)
        assert out.shape == (3, 48, 80)
    out, _ = build_transforms("detr", train=False, imgsz=40)(image, target)
    assert min(out.shape[-2:]) == 40 and out.shape[-1] == 60  # short side 40, aspect kept
    out, _ = build_transforms("detr", train=False, imgsz=800)(image, target)
    assert out.shape[-2:] == (800, 1200)
    # a mean-coloured image normalises to ~0; without normalisation pixels stay in [0, 1]
    mean_image = tv_tensors.Image(
        torch.tensor([round(255 * m) for m in IMAGENET_MEAN], dtype=torch.uint8)[:, None, None].expand(3, 60, 90)
    )
    out, _ = build_transforms("light", train=False, imgsz=32)(mean_image, target)
    assert out.abs().max() < 0.02
    out, _ = build_transforms("light", train=False, imgsz=32, normalize=False)(image, target)
    assert out.min() >= 0 and out.max() <= 1


def test_detr_train_sizes_follow_the_recipe():
    torch.manual_seed(0)
    tf = build_transforms("detr", train=True, imgsz=800)
    image, target = _sample(500, 700, [[100, 100, 300, 300]])
    allowed = set(range(480, 801, 32))
    for _ in range(10):
        out, _ = tf(image, target)
        h, w = out.shape[-2:]
        assert min(h, w) in allowed or max(h, w) == 1333


def test_pil_input_and_unknown_recipe():
    from PIL import Image

    pil = Image.new("RGB", (50, 40), (255, 255, 255))
    _, target = _sample(40, 50, [[5, 5, 20, 20]])
    out, t = build_transforms("light", train=True, imgsz=32)(pil, target)
    assert out.shape == (3, 32, 32) and t["boxes"].canvas_size == (32, 32)
    with pytest.raises(DecodetError, match="unknown augmentation recipe 'yolo'"):
        build_transforms("yolo", train=True, imgsz=32)


def test_random_size_crop_bounds():
    torch.manual_seed(0)
    crop = RandomSizeCrop(20, 30)
    for _ in range(20):
        image, target = _sample(40, 50, [[0, 0, 50, 40]])
        out, t = crop(image, target)
        h, w = out.shape[-2:]
        assert 20 <= h <= 30 and 20 <= w <= 30
        assert t["boxes"].tolist() == [[0, 0, w, h]]  # the full-image box is clipped to the crop
    image, target = _sample(10, 12, [[0, 0, 5, 5]])  # smaller than min_size: no crop bigger than the image
    assert crop(image, target)[0].shape[-2:] == (10, 12)


def _item(h, w, boxes, image_id):
    image = torch.rand(3, h, w)
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(h, w)
        ),
        "labels": torch.arange(len(boxes)),
        "image_id": image_id,
        "orig_size": torch.tensor([2 * h, 2 * w]),
    }
    return image, target


def test_collate_pads_and_normalises_to_the_canvas():
    a, b = _item(10, 20, [[2, 4, 10, 8]], 1), _item(16, 12, [], 2)
    images, targets = collate([a, b])
    assert images.shape == (2, 3, 16, 20) and type(images) is torch.Tensor
    assert torch.equal(images[0, :, :10, :20], a[0]) and images[0, :, 10:].abs().sum() == 0
    assert torch.equal(images[1, :, :16, :12], b[0]) and images[1, :, :, 12:].abs().sum() == 0
    t0, t1 = targets
    # cx = 6 / 20, cy = 6 / 16, w = 8 / 20, h = 4 / 16: relative to the padded 20 x 16 canvas
    torch.testing.assert_close(t0["boxes"], torch.tensor([[0.3, 0.375, 0.4, 0.25]]))
    assert type(t0["boxes"]) is torch.Tensor and t0["boxes"].dtype == torch.float32
    assert t0["size"].tolist() == [10, 20] and t1["size"].tolist() == [16, 12]
    assert t0["orig_size"].tolist() == [20, 40] and t0["image_id"] == 1 and t0["labels"].tolist() == [0]
    assert t1["boxes"].shape == (0, 4)
    images, targets = collate([a, b], size_divisor=32)
    assert images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(targets[0]["boxes"], torch.tensor([[6 / 32, 6 / 32, 8 / 32, 4 / 32]]))


def test_collate_round_trip_to_pixels():
    """Boxes * canvas size recover the pixel boxes of the transformed image."""
    tf = build_transforms("detr", train=False, imgsz=64)
    batch = [tf(*_sample(60, 90, [[10, 12, 40, 30]])), tf(*_sample(90, 60, [[5, 6, 20, 50]]))]
    images, targets = collate(batch)
    H, W = images.shape[-2:]
    for (_, t_in), t in zip(batch, targets):
        cx, cy, w, h = (t["boxes"][0] * torch.tensor([W, H, W, H])).tolist()
        torch.testing.assert_close(
            torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]), t_in["boxes"][0].as_subclass(torch.Tensor)
        )


def test_multiscale_collate():
    torch.manual_seed(0)
    batch = [_item(64, 64, [[8, 8, 40, 24]], 1), _item(64, 64, [], 2)]
    ms = MultiScaleCollate([32, 96])
    seen = set()
    for _ in range(10):
        images, targets = ms(batch)
        s = images.shape[-1]
        seen.add(s)
        assert images.shape == (2, 3, s, s)
        torch.testing.assert_close(targets[0]["boxes"], torch.tensor([[0.375, 0.25, 0.5, 0.25]]))
        assert targets[0]["size"].tolist() == [s, s]
    assert seen == {32, 96}
    ms.enabled = False
    assert ms(batch)[0].shape == (2, 3, 64, 64)


def test_multiscale_sizes():
    assert multiscale_sizes(640) == [480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800]
    assert multiscale_sizes(256) == [192, 224, 256, 256, 256, 288, 320]


def test_light_zoom_range():
    """``zoom`` bounds the light recipe's random scaling: 0 keeps the size (flip and shift only)."""
    torch.manual_seed(0)
    sizes = {}
    for zoom in (0.0, 0.4):
        tf = build_transforms("light", train=True, imgsz=128, normalize=False, zoom=zoom)
        widths = []
        for _ in range(40):
            image, target = _sample(128, 128, [[44, 44, 84, 84]])  # 40 px, far from the border
            _, t = tf(image, target)
            if len(t["boxes"]):
                widths.append(float(t["boxes"][0, 2] - t["boxes"][0, 0]))
        sizes[zoom] = torch.tensor(widths)
    assert torch.allclose(sizes[0.0], torch.full_like(sizes[0.0], 40.0), atol=1.0)
    assert sizes[0.4].min() < 34 and sizes[0.4].max() > 46 and (sizes[0.4] >= 40 * 0.6 - 1).all()
    with pytest.raises(DecodetError, match="zoom"):
        build_transforms("light", train=True, imgsz=128, zoom=1.5)


def test_light_shift_and_jitter_switch_off():
    """``shift=0, jitter=0, zoom=0``: only the flip remains (boxes at x or mirrored x, pixels
    untouched); the default shift moves boxes by up to 10% of the side."""
    torch.manual_seed(0)
    plain = build_transforms("light", train=True, imgsz=128, normalize=False, zoom=0.0, shift=0.0, jitter=0.0)
    shifted = build_transforms("light", train=True, imgsz=128, normalize=False, zoom=0.0)
    lefts = set()
    moved = []
    for _ in range(30):
        image, target = _sample(128, 128, [[44, 30, 84, 70]])
        out, t = plain(image, target)
        lefts.add(round(float(t["boxes"][0, 0])))
        flipped = round(float(t["boxes"][0, 0])) == 128 - 84
        expected = image.flip(-1) if flipped else image
        assert torch.equal((out * 255).round().to(torch.uint8), expected)  # no shift, no colour change
        _, t2 = shifted(*_sample(128, 128, [[44, 30, 84, 70]]))
        moved.append(float(t2["boxes"][0, 1]) - 30)
    assert lefts == {44, 128 - 84}
    assert max(abs(m) for m in moved) > 2 and all(abs(m) <= 12.8 + 1 for m in moved)
    with pytest.raises(DecodetError, match="shift"):
        build_transforms("light", train=True, imgsz=128, shift=1.0)
