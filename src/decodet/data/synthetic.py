"""The bundled dataset: coloured, textured shapes on cluttered backgrounds, in COCO format.

``generate_synthetic(out_dir)`` writes ``data.yaml`` (naming both splits), ``train/000001.jpg ...``, ``val/...``
and ``annotations/instances_{train,val}.json``.

Eight classes (:data:`CLASSES`), each a distinct shape with its own texture; colour is drawn per instance from
the same distribution for every class, so only shape (and texture, on larger objects) identifies the class.
Category ids are deliberately not contiguous (gaps at 4 and 8).

Per image: 1 to 12 objects (fewer when they do not fit, never 0), sizes log-uniform from 7% to 50% of the
image side, random rotation (except circles and rings), up to ~20% cut off by the image border. Backgrounds:
a colour gradient, low-frequency blotches, pixel noise, random lines and soft blobs (distractors, not
classes); a few thin lines are also drawn over the objects.

Occlusion rule: objects may overlap, later ones on top, but an object is only placed if every object already
there keeps at least half of its pixels visible, so nothing heavily hidden is annotated. The box is the
object's full extent inside the image (occluded parts included), tight to its pixels; ``area`` is its visible
pixel count.

Deterministic: image ``i`` of a split depends only on ``(seed, split, i)``, so the same arguments give
byte-identical files. Numpy + Pillow only, a few ms per 256 px image."""

from __future__ import annotations

import colorsys
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from decodet.errors import DecodetError
from decodet.io.atomic import atomic_write_text

logger = logging.getLogger(__name__)

MIN_SIZE_FRACTION = 0.07  # 18 px at 256: objects below ~15 px carry no texture and little shape
MAX_SIZE_FRACTION = 0.5  # largest: half the image side
MAX_OBJECTS = 12
MIN_VISIBLE = 0.5  # an annotated object always keeps at least this fraction of its pixels visible
_SPLIT_CODES = {"train": 0, "val": 1}


def generate_synthetic(
    out_dir: str | os.PathLike,
    train: int = 2000,
    val: int = 200,
    image_size: int = 256,
    seed: int = 0,
    image_format: str = "jpg",
    overwrite: bool = False,
    size_range: tuple[float, float] = (MIN_SIZE_FRACTION, MAX_SIZE_FRACTION),
    max_objects: int = MAX_OBJECTS,
) -> Path:
    """Write the synthetic shapes dataset (module docstring) and return ``out_dir`` as a ``Path``, which
    ``decodet.data.resolve_data(out_dir)`` reads.

    Args:
        out_dir: dataset root to create; must be empty or absent unless ``overwrite``.
        train, val: images per split (``val=0`` writes no val split).
        image_format: ``"jpg"`` (quality 90, small and fast) or ``"png"`` (lossless).
        overwrite: replace an existing dataset in ``out_dir`` (only its ``train/``, ``val/``, ``annotations/``
            and ``data.yaml`` are removed).
        size_range: smallest and largest object size as fractions of ``image_size``.
        max_objects: objects per image are drawn from ``1..max_objects``."""
    out = Path(out_dir)
    if image_format not in ("jpg", "png"):
        raise DecodetError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if train < 1 or val < 0 or image_size < 32 or max_objects < 1:
        raise DecodetError(
            f"need train >= 1, val >= 0, image_size >= 32, max_objects >= 1 "
            f"(got {train}, {val}, {image_size}, {max_objects})"
        )
    if not 0 < size_range[0] <= size_range[1] <= 1:
        raise DecodetError(f"size_range must be 0 < min <= max <= 1, got {size_range}")
    if out.exists() and not out.is_dir():
        raise DecodetError("output path exists and is not a folder", out)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DecodetError("output folder is not empty (pass overwrite=True to replace a dataset there)", out)
        for name in ("train", "val", "annotations"):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "data.yaml").unlink(missing_ok=True)

    (out / "annotations").mkdir(parents=True, exist_ok=True)
    splits = {"train": train, "val": val} if val else {"train": train}
    draw = lambda rng: render_image(image_size, rng, size_range, max_objects)
    for split, count in splits.items():
        _write_split(out, split, count, draw, seed, image_format)
    _write_data_yaml(out, splits, image_size, seed)
    logger.info("wrote synthetic dataset to %s (%s)", out, ", ".join(f"{n} {s}" for s, n in splits.items()))
    return out


def render_image(
    image_size: int,
    rng: np.random.Generator,
    size_range: tuple[float, float] = (MIN_SIZE_FRACTION, MAX_SIZE_FRACTION),
    max_objects: int = MAX_OBJECTS,
    with_masks: bool = False,
) -> tuple[np.ndarray, list[dict]]:
    """Draw one square image of side ``image_size`` (object sizes as fractions of it in ``size_range``).

    Returns ``image``: uint8 [S, S, 3]; ``objects``: dicts with ``category_id``, ``bbox`` (``[x, y, w, h]``
    pixels, COCO) and ``area`` (visible pixels); with ``with_masks`` also ``mask`` (bool [S, S], the whole
    object) and ``visible`` (bool [S, S])."""
    S = image_size
    canvas = _background(S, rng)
    _draw_lines(canvas, rng, int(rng.integers(2, 9)), max_width=3)
    for _ in range(int(rng.integers(0, 5))):
        _soft_blob(canvas, rng)

    owner = np.full((S, S), -1, dtype=np.int16)  # index of the topmost object on each pixel
    full: list[int] = []  # in-image pixel count of each placed object
    visible: list[int] = []
    placed: list[tuple[int, tuple[int, int, int, int], tuple[int, int], np.ndarray]] = []  # class, xyxy, origin, mask
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20 if placed else 200):  # the first object always finds a place
            cls = int(rng.integers(len(CLASSES)))
            obj = _sample_object(cls, S, size_range, rng)
            if obj is None:
                continue
            (y0, x0), mask, texture = obj
            region = owner[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
            covered = region[mask]
            lost = np.bincount(covered[covered >= 0], minlength=len(full))
            if any(v - lo < MIN_VISIBLE * f for v, lo, f in zip(visible, lost, full)):
                continue  # would hide an earlier object too much: draw another one
            k = len(full)
            region[mask] = k
            visible = [v - lo for v, lo in zip(visible, lost)] + [int(mask.sum())]
            full.append(visible[-1])
            _paint(canvas, (y0, x0), mask, texture, rng)
            ys, xs = np.nonzero(mask)
            box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
            placed.append((cls, box, (y0, x0), mask))
            break

    _draw_lines(canvas, rng, int(rng.integers(0, 4)), max_width=1)
    canvas += rng.standard_normal((S, S, 1), dtype=np.float32) * rng.uniform(2.0, 8.0)  # luminance noise
    image = np.clip(canvas, 0, 255).astype(np.uint8)

    areas = np.bincount(owner[owner >= 0].ravel(), minlength=len(placed))
    objects = [
        {
            "category_id": CLASSES[cls][0],
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "area": float(areas[k]),
        }
        for k, (cls, (x0, y0, x1, y1), _, _) in enumerate(placed)
    ]
    if with_masks:
        for k, (obj, (_, _, (y0, x0), mask)) in enumerate(zip(objects, placed)):
            obj["mask"] = np.zeros((S, S), dtype=bool)
            obj["mask"][y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] = mask
            obj["visible"] = owner == k
    return image, objects


# ---------------------------------------------------------------------------- shapes


def _polygon(n: int, R: float, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Regular n-gon with circumradius R, a vertex pointing up (-v)."""
    apothem = R * math.cos(math.pi / n)
    inside = np.ones(u.shape, dtype=bool)
    for k in range(n):
        a = math.pi / 2 + (2 * k + 1) * math.pi / n  # edge normal directions
        inside &= u * math.cos(a) - v * math.sin(a) <= apothem
    return inside


def _star(R: float, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Five-pointed star, outer radius R, inner radius 0.45 R."""
    r = 0.45 * R
    sector = 2 * math.pi / 5
    phi = np.mod(np.arctan2(u, -v) + sector / 2, sector) - sector / 2  # 0 at a tip
    rho = np.hypot(u, v)
    px, py = rho * np.cos(np.abs(phi)), rho * np.sin(np.abs(phi))
    ax, ay = R, 0.0  # tip
    bx, by = r * math.cos(sector / 2), r * math.sin(sector / 2)  # inner vertex
    # inside: on the same side of the tip-to-inner-vertex edge as the centre
    return (bx - ax) * (py - ay) - (by - ay) * (px - ax) >= 0


def _circle(R, u, v):
    return u * u + v * v <= R * R


def _square(R, u, v):
    a = R / math.sqrt(2)
    return (np.abs(u) <= a) & (np.abs(v) <= a)


def _ring(R, u, v):
    d2 = u * u + v * v
    return (d2 <= R * R) & (d2 >= (0.55 * R) ** 2)


def _cross(R, u, v):
    w, length = 0.3 * R, R
    au, av = np.abs(u), np.abs(v)
    return ((au <= w) & (av <= length)) | ((av <= w) & (au <= length))


def _ellipse(R, u, v):
    return (u / R) ** 2 + (v / (0.55 * R)) ** 2 <= 1


# Texture periods stay a few pixels wide at any object size, so a texture element never looks like a small object.
def _period(R: float, frac: float, lo: float, hi: float) -> float:
    return min(max(lo, R * frac), hi)


def _stripes(R, u, v):
    return np.floor(u / _period(R, 1 / 3, 1.5, 3.0)) % 2 == 0


def _checker(R, u, v):
    p = _period(R, 1 / 3, 1.5, 3.0)
    return (np.floor(u / p) + np.floor(v / p)) % 2 == 0


def _dots(R, u, v):
    p = _period(R, 1 / 2.2, 3.0, 5.0)
    du, dv = np.mod(u, p) - p / 2, np.mod(v, p) - p / 2
    return du * du + dv * dv <= (0.3 * p) ** 2


def _plain(R, u, v):
    return np.zeros(u.shape, dtype=bool)


def _crosshatch(R, u, v):
    p = _period(R, 1 / 3, 2.0, 3.0)
    return (np.floor((u + v) / p) % 2 == 0) ^ (np.floor((u - v) / p) % 2 == 0)


def _grid(R, u, v):
    p = _period(R, 1 / 2.5, 3.0, 5.0)
    t = max(1.0, 0.3 * p)
    return (np.mod(u, p) < t) | (np.mod(v, p) < t)


def _diagonal(R, u, v):
    return np.floor((u + v) / _period(R, 1 / 2.5, 1.5, 3.0)) % 2 == 0


ShapeFn = Callable[[float, np.ndarray, np.ndarray], np.ndarray]

# (category id, name, shape mask, texture mask, rotates): ids deliberately not contiguous.
CLASSES: list[tuple[int, str, ShapeFn, ShapeFn, bool]] = [
    (1, "circle", _circle, _stripes, True),  # rotating the stripes, not the circle
    (2, "square", _square, _checker, True),
    (3, "triangle", lambda R, u, v: _polygon(3, R, u, v), _dots, True),
    (5, "ring", _ring, _plain, False),
    (6, "cross", _cross, _plain, True),
    (7, "star", _star, _crosshatch, True),
    (9, "hexagon", lambda R, u, v: _polygon(6, R, u, v), _grid, True),
    (10, "ellipse", _ellipse, _diagonal, True),
]
CATEGORY_IDS = [c[0] for c in CLASSES]
CLASS_NAMES = [c[1] for c in CLASSES]


def _sample_object(cls: int, S: int, size_range: tuple[float, float], rng: np.random.Generator):
    """Random pose of class ``cls``: ((top, left), mask [h, w] bool, texture [h, w] bool), clipped to the image."""
    _, _, shape, texture, rotates = CLASSES[cls]
    return sample_pose(shape, texture, rotates, S, size_range, rng)


def sample_pose(
    shape: Any, texture: Any, rotates: bool, S: int, size_range: tuple[float, float], rng: np.random.Generator,
    margin: float = 0.3, min_pixels: int = 12
):  # fmt: skip
    """A random pose of one object drawn by ``shape(R, u, v)`` / ``texture(R, u, v)`` (boolean masks
    in the object's rotated frame): ((top, left), mask, texture & mask), clipped to the image; None
    when fewer than ``min_pixels`` remain.  The centre lies ``margin`` x the size inside the image
    (0.3: at most ~20% of the object cut off)."""
    size = math.exp(rng.uniform(math.log(size_range[0] * S), math.log(size_range[1] * S)))
    R = size / 2
    cx, cy = rng.uniform(margin * size, S - margin * size, size=2)
    theta = rng.uniform(0, 2 * math.pi) if rotates else 0.0
    x0, y0 = max(0, math.floor(cx - R) - 1), max(0, math.floor(cy - R) - 1)
    x1, y1 = min(S, math.ceil(cx + R) + 2), min(S, math.ceil(cy + R) + 2)
    xs = np.arange(x0, x1, dtype=np.float32) + 0.5 - cx
    ys = np.arange(y0, y1, dtype=np.float32) + 0.5 - cy
    c, s = math.cos(theta), math.sin(theta)
    u = xs[None, :] * c + ys[:, None] * s
    v = -xs[None, :] * s + ys[:, None] * c
    mask = shape(R, u, v)
    if mask.sum() < min_pixels:
        return None
    return (y0, x0), mask, texture(R, u, v) & mask


# ---------------------------------------------------------------------------- painting


def _random_colour(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> np.ndarray:
    h, s, v = rng.uniform(0, 1), rng.uniform(*saturation), rng.uniform(*value)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255


def _paint(canvas: np.ndarray, origin: tuple[int, int], mask: np.ndarray, texture: np.ndarray, rng) -> None:
    y0, x0 = origin
    region = canvas[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
    background = region[mask].mean(axis=0)
    for _ in range(10):  # a colour that stands out from what lies underneath
        base = _random_colour(rng, (0.45, 1.0), (0.45, 1.0))
        if np.linalg.norm(base - background) > 90:
            break
    second = base * 0.35 if rng.uniform() < 0.5 else base * 0.35 + 255 * 0.65
    colours = np.where(texture[mask][:, None], second, base)
    shade = 1 + rng.uniform(-0.15, 0.15) * np.linspace(-1, 1, mask.shape[1], dtype=np.float32)
    region[mask] = colours * np.broadcast_to(shade[None, :], mask.shape)[mask][:, None]


def _background(S: int, rng: np.random.Generator) -> np.ndarray:
    """Gradient between two muted colours with low-frequency blotches, float32 [S, S, 3].  Cheap: built on a
    coarse grid and upsampled bilinearly in one resize (a linear gradient survives bilinear interpolation)."""
    a = _random_colour(rng, (0.0, 0.45), (0.15, 0.85))
    b = _random_colour(rng, (0.0, 0.45), (0.15, 0.85))
    phi = rng.uniform(0, 2 * math.pi)
    cells = int(rng.integers(3, 9))
    g = (np.arange(cells, dtype=np.float32) + 0.5) / cells - 0.5
    t = np.clip(g[None, :] * math.cos(phi) + g[:, None] * math.sin(phi) + 0.5, 0, 1)[..., None]
    coarse = a + (b - a) * t + rng.standard_normal((cells, cells, 3)) * rng.uniform(8, 30)
    coarse = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8))
    return np.asarray(coarse.resize((S, S), Image.BILINEAR), dtype=np.float32).copy()


def _draw_lines(canvas: np.ndarray, rng: np.random.Generator, count: int, max_width: int) -> None:
    """Random polylines, drawn with Pillow into a colour layer + mask, copied onto ``canvas``."""
    if count == 0:
        return
    S = canvas.shape[0]
    layer, mask = Image.new("RGB", (S, S)), Image.new("L", (S, S))
    draw_layer, draw_mask = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
    for _ in range(count):
        n_points = int(rng.integers(2, 5))
        points = [tuple(float(p) for p in rng.uniform(-0.1 * S, 1.1 * S, size=2)) for _ in range(n_points)]
        colour = tuple(int(c) for c in _random_colour(rng, (0.0, 0.8), (0.1, 1.0)))
        width = int(rng.integers(1, max_width + 1))
        draw_layer.line(points, fill=colour, width=width)
        draw_mask.line(points, fill=255, width=width)
    on = np.asarray(mask) > 0
    canvas[on] = np.asarray(layer)[on]


def _soft_blob(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """A blurry elliptical smudge: soft-edged, so it never looks like a (hard-edged) object."""
    S = canvas.shape[0]
    sx, sy = rng.uniform(0.02 * S, 0.12 * S, size=2)
    cx, cy = rng.uniform(0, S, size=2)
    x0, x1 = max(0, int(cx - 3 * sx)), min(S, int(cx + 3 * sx) + 1)
    y0, y1 = max(0, int(cy - 3 * sy)), min(S, int(cy + 3 * sy) + 1)
    if x1 <= x0 or y1 <= y0:
        return
    gx = np.exp(-0.5 * ((np.arange(x0, x1) - cx) / sx) ** 2).astype(np.float32)
    gy = np.exp(-0.5 * ((np.arange(y0, y1) - cy) / sy) ** 2).astype(np.float32)
    alpha = (gy[:, None] * gx[None, :] * rng.uniform(0.3, 0.7))[..., None]
    colour = _random_colour(rng, (0.0, 0.7), (0.1, 1.0))
    region = canvas[y0:y1, x0:x1]
    region += alpha * (colour - region)


# ---------------------------------------------------------------------------- files


def _write_split(out: Path, split: str, count: int, draw: Callable, seed: int, image_format: str) -> None:
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], i])
        pixels, objects = draw(rng)
        file_name = f"{i + 1:06d}.{image_format}"
        if image_format == "jpg":
            Image.fromarray(pixels).save(folder / file_name, quality=90)
        else:
            Image.fromarray(pixels).save(folder / file_name, compress_level=1)
        images.append({"id": i + 1, "file_name": file_name, "width": pixels.shape[1], "height": pixels.shape[0]})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **obj, "iscrowd": 0})
    content = {
        "info": {"description": f"decodet synthetic shapes, {split} split", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "shape"} for cid, name, *_ in CLASSES],
    }
    atomic_write_text(out / "annotations" / f"instances_{split}.json", json.dumps(content))


def _write_data_yaml(out: Path, splits: dict[str, int], S: int, seed: int) -> None:
    lines = [
        f"# decodet synthetic shapes dataset: {S}x{S} images, seed {seed}",
        "# no 'path' key: the dataset root is this file's folder",
        f"names: [{', '.join(CLASS_NAMES)}]",
    ]
    for split in splits:
        lines += [f"{split}:", f"  images: {split}", f"  annotations: annotations/instances_{split}.json"]
    (out / "data.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
