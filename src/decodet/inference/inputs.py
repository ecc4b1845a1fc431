"""Inputs for inference: any image source -> decoded images -> fixed-size model tensors.

Shared by :class:`~decodet.runtime.detector.Detector` and int8 calibration in
:mod:`decodet.export.onnx`.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from decodet.config import IMAGENET_MEAN, IMAGENET_STD
from decodet.data.images import load_image, to_rgb
from decodet.errors import DecodetError
from decodet.inference.video import VIDEO_SUFFIXES, read_frames

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class ImageItem:
    """One input image, decoded lazily: ``image`` is a path until :func:`iter_images` reads it.

    Video frames also carry their ``frame`` index (from 0) and ``time`` (seconds).
    """

    image: Any  # PIL.Image | np.ndarray | Tensor once read
    path: str | None = None
    frame: int | None = None
    time: float | None = None


def iter_images(source: Any, on_error: str = "skip") -> Iterator[ImageItem]:
    """Expand ``source`` into decoded images, lazily, in order.

    ``source``: a path to an image, a folder (its image files, sorted by name, not
    recursive), a glob pattern (matches sorted), a ``PIL.Image``, a numpy array
    (``[H, W, 3]``/``[H, W, 4]``/``[H, W]``, or ``[B, H, W, C]`` for several), a tensor
    (``[3, H, W]``/``[1, H, W]``/``[H, W]``, or ``[B, 3, H, W]`` for several), or a
    list/tuple of any of these.  A video file (see :mod:`decodet.inference.video`) yields its
    frames, decoded one at a time; any other iterable (a generator of frames, of
    ``ImageItem``) is consumed lazily, item by item.

    A file named explicitly that cannot be read raises :class:`DecodetError`; files found
    by expanding a folder or pattern are skipped with a warning (``on_error="raise"``:
    raise for those too).  A folder or pattern with no image files is a ``DecodetError``.
    """
    if isinstance(source, list | tuple):
        for item in source:
            yield from iter_images(item, on_error)
        return
    if isinstance(source, Tensor | np.ndarray) and source.ndim == 4:
        for image in source:
            yield ImageItem(image)
        return
    if isinstance(source, Image.Image | np.ndarray | Tensor):
        yield ImageItem(source)
        return
    if isinstance(source, ImageItem):
        if isinstance(source.image, str | os.PathLike):
            source = replace(source, image=load_image(source.image), path=source.path or str(source.image))
        yield source
        return
    if isinstance(source, Iterable) and not isinstance(source, str | bytes | os.PathLike | Mapping):
        for item in source:
            yield from iter_images(item, on_error)
        return
    if not isinstance(source, str | os.PathLike):
        raise DecodetError(f"cannot read images from a {type(source).__name__} (expected a path, image or array)")
    path = Path(source)
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        for frame in read_frames(path):
            yield ImageItem(frame.image, str(path), frame.index, frame.time)
        return
    if path.is_file():
        yield ImageItem(load_image(path), str(path))
        return
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DecodetError(f"folder holds no image files ({', '.join(IMAGE_SUFFIXES)})", path)
    elif glob.has_magic(str(source)):
        files = sorted(Path(p) for p in glob.glob(str(source), recursive=True) if Path(p).is_file())
        if not files:
            raise DecodetError("no files match this pattern", source)
    else:
        raise DecodetError("image file or folder not found", path)
    read = 0
    for file in files:
        try:
            image = load_image(file)
        except DecodetError as exc:
            if on_error == "raise":
                raise
            log.warning("skipping %s", exc)
            continue
        read += 1
        yield ImageItem(image, str(file))
    if read == 0:
        raise DecodetError(f"none of the {len(files)} files could be read as an image", source)


def to_uint8_chw(image: Any) -> Tensor:
    """A PIL image, numpy array or tensor (see :func:`iter_images`) -> RGB ``uint8 [3, H, W]``.

    Float arrays/tensors must hold values in [0, 1]; they are rounded to 8 bits so that a
    float input and its uint8 original give the same detections.
    """
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.array(to_rgb(image), dtype=np.uint8)).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 4:
            return to_uint8_chw(Image.fromarray(_as_uint8(image, "array"), "RGBA"))
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3)):
            arr = _as_uint8(image, "array")
            arr = arr if arr.ndim == 3 else arr[:, :, None]
            return _to3(torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1))
        raise DecodetError(f"numpy image must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; got {list(image.shape)}")
    if isinstance(image, Tensor):
        t = image.detach().cpu()
        t = t[None] if t.dim() == 2 else t
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise DecodetError(f"image tensor must be [3, H, W], [1, H, W] or [H, W]; got {list(image.shape)}")
        return _to3(torch.from_numpy(_as_uint8(t.numpy(), "tensor")))
    raise DecodetError(f"unsupported image type {type(image).__name__}")


def _as_uint8(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        if a.size and (np.nanmin(a) < 0.0 or np.nanmax(a) > 1.0):
            raise DecodetError(f"float image {what} must hold values in [0, 1] (got {np.nanmin(a)}..{np.nanmax(a)})")
        return np.rint(np.nan_to_num(a) * 255.0).astype(np.uint8)
    raise DecodetError(f"image {what} must be uint8 or float in [0, 1], got {a.dtype}")


def _to3(t: Tensor) -> Tensor:
    return t.expand(3, -1, -1).contiguous() if t.shape[0] == 1 else t.contiguous()


def preprocess(
    image: Any,
    size: tuple[int, int],
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> tuple[Tensor, tuple[int, int]]:
    """One image -> (``[3, H, W]`` float normalised at ``size``, original ``(h, w)``).

    Resize uint8 with antialiasing, then scale to [0, 1] and normalise — the evaluation
    transform of ``data.transforms`` (``v2.Resize((H, W), antialias=True)``).
    """
    x = to_uint8_chw(image)
    orig = (int(x.shape[1]), int(x.shape[2]))
    if orig[0] < 1 or orig[1] < 1:
        raise DecodetError(f"image has no pixels ({orig[0]}x{orig[1]})")
    x = TF.resize(x, list(size), antialias=True)
    x = x.float().div_(255.0)
    return TF.normalize(x, list(mean), list(std)), orig
