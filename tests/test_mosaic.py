"""decodet.data.mosaic: four samples tiled 2x2 (denser one-to-one targets); boxes follow their pixels."""

from __future__ import annotations

import torch
from torchvision import tv_tensors

from decodet.data.mosaic import Mosaic, tile


class Boxes(torch.utils.data.Dataset):
    """Sample i: a 3x64x64 black image with one white box whose position depends on i; label i."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        img = torch.zeros(3, 64, 64)
        x0, y0 = 4 + 4 * i, 8 + 2 * i
        img[:, y0 : y0 + 20, x0 : x0 + 24] = 1.0
        boxes = tv_tensors.BoundingBoxes([[x0, y0, x0 + 24, y0 + 20]], format="XYXY", canvas_size=(64, 64))
        return tv_tensors.Image(img), {"boxes": boxes, "labels": torch.tensor([i]), "image_id": i}


def test_tiled_boxes_cover_their_objects_pixels() -> None:
    data = Boxes()
    image, target = tile([data[i] for i in (0, 3, 5, 7)])
    assert image.shape == (3, 64, 64) and target["image_id"] == 0
    assert target["labels"].tolist() == [0, 3, 5, 7]
    for k, box in enumerate(target["boxes"].tolist()):
        x0, y0, x1, y1 = (round(v) for v in box)
        assert (x0 >= 32) == (k % 2 == 1) and (y0 >= 32) == (k // 2 == 1)  # its quadrant
        assert image[:, y0 + 1 : y1 - 1, x0 + 1 : x1 - 1].min() > 0.9  # white inside (antialiased rim aside)
        assert image[:, y0 + 1 : y1 - 1, max(x0 - 3, 0)].max() < 0.5 or x0 < 3  # black just left of it
        assert (x1 - x0, y1 - y0) == (12, 10)  # half the size


def test_probability_zero_passes_through_one_always_tiles() -> None:
    data = Boxes()
    torch.manual_seed(0)
    plain = Mosaic(data, 0.0)
    assert len(plain) == 8 and torch.equal(plain[2][0], data[2][0])
    tiled = Mosaic(data, 1.0)
    for i in range(4):
        image, target = tiled[i]
        assert len(target["boxes"]) == 4 and target["labels"][0] == i and image.shape == (3, 64, 64)
    half = Mosaic(data, 0.5)
    counts = [len(half[i % 8][1]["boxes"]) for i in range(200)]
    assert set(counts) == {1, 4} and 60 < counts.count(4) < 140


def test_boxes_under_the_minimum_size_are_dropped() -> None:
    data = Boxes()
    _, target = tile([data[i] for i in range(4)], min_size=11.0)  # tiled boxes are 12 x 10
    assert len(target["boxes"]) == 0 and len(target["labels"]) == 0
