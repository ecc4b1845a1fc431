"""Denser one-to-one targets per step: four training samples tiled into one (DEIM's Dense O2O).

One-to-one matching gives each object one positive query, so an image with two objects teaches the
decoder little per step.  Tiling four samples 2x2, each at half the side, puts four times the objects
in the same pixels: the same compute per step, four times the positives.  Training only; a sample is
tiled with probability ``prob``, else passed through.

Written here rather than taken from a library: torchvision has no mosaic, and the samples arrive
already transformed (a square of the recipe's size, boxes as ``tv_tensors.BoundingBoxes``), so the
tiling is a resize and a copy per tile.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as nnf
from torch.utils.data import Dataset
from torchvision import tv_tensors

Sample = tuple[torch.Tensor, dict[str, Any]]


class Mosaic(Dataset):
    """``dataset``'s samples, each tiled 2x2 with three random others with probability ``prob``.

    A tiled sample keeps the first sample's size ``[3, H, W]``, ``image_id`` and ``orig_size``; its
    boxes (XYXY pixels) are the four samples' boxes scaled by one half and moved to their quadrant,
    those under ``min_size`` pixels wide or high dropped.  Randomness is torch's (seeded per epoch and
    per loader worker, as the transforms')."""

    def __init__(self, dataset: Dataset, prob: float, min_size: float = 1.0) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"mosaic probability must lie in [0, 1], got {prob}")
        self.dataset, self.prob, self.min_size = dataset, float(prob), float(min_size)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Sample:
        first = self.dataset[index]
        if self.prob <= 0.0 or float(torch.rand(())) >= self.prob:
            return first
        others = torch.randint(len(self), (3,)).tolist()
        return tile([first, *(self.dataset[j] for j in others)], self.min_size)


def tile(samples: list[Sample], min_size: float = 1.0) -> Sample:
    """Four ``(image [3, H_i, W_i], target)`` samples as one ``[3, H, W]`` sample (``H, W`` the first's):
    top-left, top-right, bottom-left, bottom-right, each resized to ``H/2 x W/2``."""
    image0, target0 = samples[0]
    _, H, W = image0.shape
    h, w = H // 2, W // 2
    canvas = image0.new_zeros(image0.shape).as_subclass(torch.Tensor)
    boxes, labels = [], []
    for k, (image, target) in enumerate(samples):
        y0, x0 = (k // 2) * h, (k % 2) * w
        img = image.as_subclass(torch.Tensor)[None]
        canvas[:, y0 : y0 + h, x0 : x0 + w] = nnf.interpolate(img, size=(h, w), mode="bilinear", antialias=True)[0]
        _, hi, wi = image.shape
        b = target["boxes"].as_subclass(torch.Tensor).reshape(-1, 4)
        b = b * torch.tensor([w / wi, h / hi, w / wi, h / hi]) + torch.tensor([x0, y0, x0, y0], dtype=b.dtype)
        boxes.append(b)
        labels.append(target["labels"])
    b, lab = torch.cat(boxes), torch.cat(labels)
    keep = ((b[:, 2] - b[:, 0]) >= min_size) & ((b[:, 3] - b[:, 1]) >= min_size)
    target = dict(target0)
    target["boxes"] = tv_tensors.BoundingBoxes(b[keep], format="XYXY", canvas_size=(H, W))
    target["labels"] = lab[keep]
    return tv_tensors.Image(canvas), target
