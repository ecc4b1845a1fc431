"""Training / evaluation recipes on ``torchvision.transforms.v2``, and batching.

A sample is ``(image, target)``: ``image`` a ``tv_tensors.Image`` and ``target["boxes"]`` a
``tv_tensors.BoundingBoxes`` (XYXY pixels), so every geometric transform moves the boxes with the pixels.
Every recipe ends with: float conversion, optional ImageNet normalisation, clamping of the boxes to the image
and removal of degenerate (< 1 px) boxes.

Recipes (``build_transforms(recipe, train, imgsz)``):

- ``"detr"``: DETR's. Train: horizontal flip, then either a random short side in 480..800 (step 32, long
  side <= 1333), or a short side of 400/500/600 -> random crop of 384..600 per side -> a random short side in
  480..800. Eval: short side 800 (long <= 1333). All sizes scale by ``imgsz / 800`` (800 is the published one).
- ``"light"``: for small CPU runs. Train: resize to the fixed ``imgsz`` square (aspect ratio not kept, so
  batches need no padding), flip, random zoom 1 +- ``zoom`` with +- ``shift`` translation, mild
  brightness/contrast jitter. Eval: resize to the square.
- ``"rtdetr"``: RT-DETR's. Train: photometric distortion, zoom out (up to 4x), IoU crop (p=0.8), flip, resize
  to the ``imgsz`` square. Eval: resize to the square. Multi-scale is per batch (:class:`MultiScaleCollate`).

Areas that zoom-out / affine transforms create are filled with the ImageNet mean colour, which normalises to
0 like :func:`collate`'s padding (black when ``normalize=False``, as RT-DETR).

Batching (:func:`collate`) pads to the batch's largest image and turns boxes into normalised cxcywh
**relative to the padded canvas** (see its docstring)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch
import torch.nn.functional as nnf
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from decodet.config import IMAGENET_MEAN, IMAGENET_STD
from decodet.errors import DecodetError

RECIPES = ("detr", "light", "rtdetr")

Sample = tuple[torch.Tensor, dict[str, Any]]


def build_transforms(
    recipe: str = "light",
    train: bool = True,
    imgsz: int | Sequence[int] = 640,
    normalize: bool = True,
    zoom: float = 0.4,
    shift: float = 0.1,
    jitter: float = 0.2,
) -> v2.Compose:
    """The transform pipeline ``(image, target) -> (image, target)`` of a recipe (module docstring).

    Args:
        train: training augmentation, or the deterministic evaluation resize.
        imgsz: an int for a square (``light``, ``rtdetr``) or the short side (``detr``), or ``(height,
            width)`` (``detr`` uses the smaller of the two).
        normalize: ImageNet mean/std normalisation; ``False`` keeps [0, 1] (RT-DETR's convention).
        zoom, shift, jitter: ``light`` training only (0: none): random zoom in ``1 +- zoom``, random shift up
            to ``shift`` of each side, brightness and contrast in ``1 +- jitter``.

    Takes a PIL image or uint8 ``tv_tensors.Image`` and a target with ``boxes`` and ``labels``."""
    h, w = _pair(imgsz)
    fill = _fill(normalize)
    if recipe == "detr":
        ops = _detr(min(h, w), train)
    elif recipe == "light":
        for name, value in (("zoom", zoom), ("shift", shift), ("jitter", jitter)):
            if not 0 <= value < 1:
                raise DecodetError(f"{name} must be in [0, 1), got {value}")
        ops = _light(h, w, train, fill, zoom, shift, jitter)
    elif recipe == "rtdetr":
        ops = _rtdetr(h, w, train, fill)
    else:
        raise DecodetError(f"unknown augmentation recipe {recipe!r} (choose from {', '.join(RECIPES)})")
    ops = [v2.ToImage(), *ops, v2.ToDtype(torch.float32, scale=True)]
    if normalize:
        ops.append(v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD))
    ops += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0)]
    return v2.Compose(ops)


def _detr(short: int, train: bool) -> list[v2.Transform]:
    r = short / 800
    scales = [round(s * r) for s in range(480, 801, 32)]
    max_size = round(1333 * r)
    if not train:
        return [ShortSideResize(short, max_size=max_size)]
    return [
        v2.RandomHorizontalFlip(),
        v2.RandomChoice(
            [
                ShortSideResize(scales, max_size=max_size),
                v2.Compose(
                    [
                        ShortSideResize([round(s * r) for s in (400, 500, 600)]),
                        RandomSizeCrop(round(384 * r), round(600 * r)),
                        ShortSideResize(scales, max_size=max_size),
                    ]
                ),
            ]
        ),
    ]


def _light(
    h: int, w: int, train: bool, fill: tuple[int, int, int], zoom: float = 0.4, shift: float = 0.1, jitter: float = 0.2
) -> list[v2.Transform]:
    resize = v2.Resize((h, w), antialias=True)
    if not train:
        return [resize]
    ops: list[v2.Transform] = [resize, v2.RandomHorizontalFlip()]
    if zoom or shift:
        scale = (1.0 - zoom, 1.0 + zoom)
        ops.append(v2.RandomAffine(degrees=0.0, translate=(shift, shift), scale=scale, fill=_image_fill(fill)))
    if jitter:
        ops.append(v2.ColorJitter(brightness=jitter, contrast=jitter))
    return ops


def _rtdetr(h: int, w: int, train: bool, fill: tuple[int, int, int]) -> list[v2.Transform]:
    resize = v2.Resize((h, w), antialias=True)
    if not train:
        return [resize]
    return [
        v2.RandomPhotometricDistort(p=0.5),
        v2.RandomZoomOut(fill=_image_fill(fill)),
        v2.RandomApply([RandomIoUCrop()], p=0.8),
        v2.SanitizeBoundingBoxes(min_size=1.0),
        v2.RandomHorizontalFlip(),
        resize,
    ]


class ShortSideResize(v2.Transform):
    """Keep-aspect resize: the short side to ``size`` (an int, or a random choice from a list), the long
    side capped at ``max_size``, as ``v2.Resize(size, max_size)``; unlike it, no side drops below 1 px,
    so a very elongated image (aspect ratio beyond ``max_size : 1``) is resized instead of failing."""

    def __init__(self, size: int | Sequence[int], max_size: int | None = None) -> None:
        super().__init__()
        self.sizes = [size] if isinstance(size, int) else [int(s) for s in size]
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _query_size(flat_inputs)
        short_side = self.sizes[_randint(0, len(self.sizes) - 1)] if len(self.sizes) > 1 else self.sizes[0]
        short, long = min(h, w), max(h, w)
        new_short, new_long = short_side, int(short_side * long / short)
        if self.max_size is not None and new_long > self.max_size:
            new_short, new_long = int(self.max_size * new_short / new_long), self.max_size
        new_short = max(new_short, 1)
        return {"size": [new_long, new_short] if w <= h else [new_short, new_long]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


class RandomIoUCrop(v2.RandomIoUCrop):
    """torchvision's IoU crop, skipping images under 4 px a side (crop height rounds to 0, then divides by 0)."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if min(_query_size(flat_inputs)) < 4:
            return {}  # RandomIoUCrop's "leave as is"
        return super().make_params(flat_inputs)


class RandomSizeCrop(v2.Transform):
    """DETR's random crop: height and width each uniform in ``[min_size, min(max_size, side)]``, at a
    uniform position; boxes are shifted and clipped (sanitise afterwards)."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _query_size(flat_inputs)
        ch = _randint(min(self.min_size, h), min(self.max_size, h))
        cw = _randint(min(self.min_size, w), min(self.max_size, w))
        return {"top": _randint(0, h - ch), "left": _randint(0, w - cw), "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.crop(inpt, **params)


def collate(batch: Sequence[Sample], size_divisor: int = 1) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Batch ``(image [3, h_i, w_i], target)`` samples by zero-padding (bottom / right) to the largest.

    Returns ``images`` float [B, 3, H, W] (``H = max h_i``, ``W = max w_i``, rounded up to a multiple of
    ``size_divisor``) and one target per image: ``labels``, ``image_id``, ``orig_size`` (int64 ``[h, w]`` of
    the original image), ``size`` (int64 ``[h_i, w_i]``, the content inside the canvas) and ``boxes``: float
    [N, 4] **normalised cxcywh relative to the padded canvas** ``W x H``, not to the image's ``w_i x h_i``:
    the models take no padding mask, so their predictions live in the canvas they see (pixels: multiply by
    ``[W, H, W, H]``; original frame: also scale by ``orig_size / size``)."""
    images = [img.as_subclass(torch.Tensor) if isinstance(img, torch.Tensor) else img for img in [b[0] for b in batch]]
    H = _round_up(max(img.shape[-2] for img in images), size_divisor)
    W = _round_up(max(img.shape[-1] for img in images), size_divisor)
    out = images[0].new_zeros((len(images), images[0].shape[0], H, W))
    targets = []
    for i, (img, (_, target)) in enumerate(zip(images, batch)):
        h, w = img.shape[-2:]
        out[i, :, :h, :w] = img
        t = dict(target)
        t["boxes"] = _normalised_cxcywh(target["boxes"], H, W)
        t["size"] = torch.tensor([h, w], dtype=torch.int64)
        targets.append(t)
    return out, targets


class MultiScaleCollate:
    """RT-DETR-style multi-scale batches: :func:`collate`, then a bilinear resize to a square side drawn from
    ``sizes`` (``torch`` randomness: DataLoader worker seeding applies). Normalised boxes stay (relative to the
    canvas); ``size`` is rescaled. ``enabled = False`` (RT-DETR's last epochs) is plain :func:`collate`."""

    def __init__(self, sizes: Sequence[int], size_divisor: int = 1) -> None:
        if not sizes:
            raise ValueError("MultiScaleCollate needs at least one size")
        self.sizes = [int(s) for s in sizes]
        self.size_divisor = size_divisor
        self.enabled = True

    def __call__(self, batch: Sequence[Sample]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        images, targets = collate(batch, self.size_divisor)
        if not self.enabled:
            return images, targets
        s = self.sizes[int(torch.randint(len(self.sizes), ()))]
        H, W = images.shape[-2:]
        if (H, W) == (s, s):
            return images, targets
        images = nnf.interpolate(images, size=(s, s), mode="bilinear", align_corners=False)
        scale = torch.tensor([s / H, s / W])
        for t in targets:
            t["size"] = (t["size"] * scale).round().to(torch.int64)
        return images, targets


def multiscale_sizes(imgsz: int, step: int = 32, spread: float = 0.25, base_repeat: int = 3) -> list[int]:
    """Square sides for :class:`MultiScaleCollate`: ``imgsz * (1 +- spread)`` in ``step``s, base repeated.
    ``multiscale_sizes(640)`` is RT-DETR's list: 480, 512, ..., 800 with 640 three times."""
    lo = max(step, math.ceil(imgsz * (1 - spread) / step) * step)
    hi = math.floor(imgsz * (1 + spread) / step) * step
    sizes = [s for s in range(lo, hi + 1, step) if s != imgsz]
    return sorted(sizes + [imgsz] * base_repeat)


def _normalised_cxcywh(boxes: torch.Tensor, H: int, W: int) -> torch.Tensor:
    if isinstance(boxes, tv_tensors.BoundingBoxes):
        boxes = F.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
        boxes = boxes.as_subclass(torch.Tensor)
    else:  # plain tensors are taken as XYXY pixels
        boxes = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], dim=-1)
    return (boxes.float() / torch.tensor([W, H, W, H], dtype=torch.float32)).reshape(-1, 4)


def _pair(imgsz: int | Sequence[int]) -> tuple[int, int]:
    pair = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(int(s) for s in imgsz)
    if len(pair) != 2 or min(pair) < 8:
        raise DecodetError(f"image size must be an int or (height, width) of at least 8, got {imgsz!r}")
    return pair


def _fill(normalize: bool) -> tuple[int, int, int]:
    """Uint8 fill colour for areas transforms create: the mean colour, i.e. 0 after normalising."""
    return tuple(round(255 * m) for m in IMAGENET_MEAN) if normalize else (0, 0, 0)


def _image_fill(fill: tuple[int, int, int]) -> dict[Any, Any]:
    return {tv_tensors.Image: fill, "others": 0}


def _query_size(flat_inputs: list[Any]) -> tuple[int, int]:
    for x in flat_inputs:
        if isinstance(x, (tv_tensors.Image, tv_tensors.BoundingBoxes, PIL.Image.Image)):
            h, w = F.get_size(x)
            return h, w
    raise TypeError("no image or bounding boxes in the sample")


def _randint(lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi + 1, ()))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m
