"""Draw detections on an image (torchvision's box drawing, Pillow's built-in font) and save it."""

from __future__ import annotations

import colorsys
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from decodet.errors import DecodetError
from decodet.io.atomic import atomic_path

ClassNames = Sequence[str] | Mapping[int, str]


def draw_detections(
    image: Image.Image | torch.Tensor | np.ndarray,
    detections: Mapping[str, Any],
    class_names: ClassNames | None = None,
    score_threshold: float = 0.3,
) -> Image.Image:
    """An RGB PIL copy of ``image`` (PIL, ``uint8`` ``[C, H, W]`` tensor with C 1 or 3, or ``uint8``
    ``[H, W(, C)]`` array) with the ``detections`` scoring at least ``score_threshold`` drawn as
    boxes labelled ``"name 0.87"``, clipped to the image, one colour per class.  ``class_names``:
    label -> name (a sequence or dict); missing names (and ``None``) show the label number.
    """
    pixels = _to_uint8_chw(image)
    height, width = pixels.shape[-2:]
    boxes = torch.as_tensor(detections["boxes"], dtype=torch.float32).detach().cpu().reshape(-1, 4)
    scores = torch.as_tensor(detections["scores"], dtype=torch.float32).detach().cpu().reshape(-1)
    labels = torch.as_tensor(detections["labels"]).detach().cpu().reshape(-1).long()
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"got {len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels")
    keep = scores >= score_threshold
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    if (boxes[:, 2:] < boxes[:, :2]).any():
        raise ValueError("boxes must be xyxy (x1 <= x2, y1 <= y2); convert xywh / cxcywh first")
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)
    if len(boxes):
        texts = [f"{class_name(class_names, int(lab))} {s:.2f}" for lab, s in zip(labels.tolist(), scores.tolist())]
        pixels = draw_bounding_boxes(
            pixels,
            boxes,
            labels=texts,
            colors=[class_color(int(lab)) for lab in labels.tolist()],
            width=max(1, round(max(height, width) / 300)),
            fill_labels=True,  # black text on a box-coloured tag stays readable on any background
        )
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def class_name(class_names: ClassNames | None, label: int) -> str:
    """``class_names[label]`` when there is one, else the label number."""
    if isinstance(class_names, Mapping):
        return str(class_names.get(label, label))
    if class_names is not None and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


def class_color(label: int) -> tuple[int, int, int]:
    """A bright colour per class; golden-ratio hue steps keep neighbouring labels far apart."""
    hue = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def save_image_atomic(img: Image.Image, path: str | os.PathLike) -> Path:
    """Save ``img`` in the format its suffix names (``.jpg``, ``.png``, ...) via temp file + rename."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise DecodetError(f"unknown image format {path.suffix!r} (use .jpg or .png)", path)
    if fmt == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    try:
        with atomic_path(path) as tmp:
            img.save(tmp, format=fmt)
    except OSError as e:
        raise DecodetError(f"cannot write image ({e})", path) from None
    return path


def _to_uint8_chw(image: Image.Image | torch.Tensor | np.ndarray) -> torch.Tensor:
    """-> ``uint8 [3, H, W]`` CPU tensor (a fresh copy)."""
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise TypeError(f"numpy images must be uint8 [H, W] or [H, W, C], got {image.dtype} {image.shape}")
        image = torch.from_numpy(np.atleast_3d(image)).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a PIL image, tensor or numpy array, got {type(image).__name__}")
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise TypeError(f"tensor images must be uint8 [C, H, W] with C in (1, 3, 4), got {image.dtype} {image.shape}")
    image = image.detach().cpu()[:3]
    return (image.expand(3, -1, -1) if image.shape[0] == 1 else image).clone().contiguous()
