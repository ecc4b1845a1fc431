"""Calibration images for int8: where they come from (:func:`calibration_source`), and batches of
preprocessed images (or smooth synthetic noise) in the exported graph's input form, for ONNX
Runtime, OpenVINO/NNCF and PT2E alike."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from decodet.config import IMAGENET_MEAN, IMAGENET_STD
from decodet.errors import DecodetError

log = logging.getLogger(__name__)


def calibration_source(calib: Any, data: str | os.PathLike | None) -> Any:
    """int8 calibration images: ``calib`` when given; else the training split of ``data`` (real
    images of the domain, never the split being evaluated), or of the bundled dataset when
    ``decodet demo`` wrote one; else ``None`` (synthetic noise, with a loud warning where used)."""
    if calib is not None:
        return calib
    if data is None and Path("data/synth/train").is_dir():
        data = "data/synth"  # the bundled dataset (decodet demo writes it there)
    if data is None:
        return None
    from decodet.data.spec import resolve_data

    spec = resolve_data(data)
    try:
        images = spec.split("train").images_dir
    except DecodetError:  # no train split
        return None
    log.info("calibrating int8 on the training images in %s", images)
    return str(images)


def calibration_batches(
    calib_images: Any,
    size: tuple[int, int],
    count: int,
    batch: int,
    norm: tuple[tuple[float, ...], tuple[float, ...]] = (IMAGENET_MEAN, IMAGENET_STD),
    seed: int = 0,
) -> Iterator[dict[str, Any]]:
    """Feeds ``{"images", "orig_sizes"}`` of ``batch`` images each, from at most ``count``
    images of ``calib_images`` (anything ``Detector`` reads), or synthetic noise if ``None``."""
    from decodet.inference.inputs import iter_images, preprocess

    if calib_images is None:
        gen = torch.Generator().manual_seed(seed)
        # smooth-ish random images (noise at a few scales) rather than pure white noise
        images = []
        for _ in range(max(count, batch)):
            img = torch.zeros(3, *size)
            for s in (4, 16, 64):
                low = torch.rand(1, 3, max(1, size[0] // s), max(1, size[1] // s), generator=gen)
                img += torch.nn.functional.interpolate(low, size=size, mode="bilinear")[0] / 3
            images.append((img * 255).round().to(torch.uint8))
        source: Iterable[Any] = ((im, None) for im in images)
    else:
        source = ((item.image, item.path) for item in iter_images(calib_images, on_error="skip"))
    buf: list[Tensor] = []
    used = 0
    for image, _ in source:
        if used >= count:
            break
        tensor, _orig = preprocess(image, size, *norm)
        buf.append(tensor)
        used += 1
        if len(buf) == batch:
            yield _feed(buf, size)
            buf = []
    if buf:
        while len(buf) < batch:  # a fixed-batch model needs full batches
            buf.append(buf[-1])
        yield _feed(buf, size)
    if used == 0:
        raise DecodetError("no calibration images could be read for int8 quantisation", _describe(calib_images))


def _describe(source: Any) -> str | None:
    return str(source) if isinstance(source, str | os.PathLike) else None


def _feed(images: list[Tensor], size: tuple[int, int]) -> dict[str, Any]:
    x = torch.stack(images).numpy()
    sizes = torch.tensor([[float(size[0]), float(size[1])]] * len(images)).numpy()
    return {"images": x, "orig_sizes": sizes}


def calibration_tensor(
    calib_images: Any, size: tuple[int, int], norm: tuple[tuple[float, ...], tuple[float, ...]], count: int = 32
) -> Tensor:
    """``[N, 3, H, W]`` float normalised calibration images (at most ``count``) from a folder /
    list of paths / images; ``None``: synthetic noise, with a loud warning."""
    if calib_images is None:
        log.warning("int8 calibration on synthetic noise images: fine for speed, NOT for accuracy (pass calib)")
    batches = calibration_batches(calib_images, size, count, 1, norm)
    return torch.cat([torch.from_numpy(b["images"]) for b in batches])
