"""Three datasets for the convergence ablation (issue 19), each with statistics of its own.

    python benchmarks/convergence/make_sets.py --out /tmp/conv_sets                  # all three
    python benchmarks/convergence/make_sets.py --out /tmp/conv_sets --which small,photo --seed 1

Each set is a COCO folder (``annotations/instances_{train,val}.json`` + ``train/`` + ``val/``)
that ``decodet data check`` and ``decodet train --data`` read as it is.  Every image is a pure
function of ``(seed, set, split, index)``, so the same arguments give the same files.

==========  =====  ===========  ==========  =========================  =======  ==============
set         side   train / val  objects     object size (of the side)  classes  category ids
==========  =====  ===========  ==========  =========================  =======  ==============
small        320   600 / 150    20 to 60    2% to 6% (6-19 px)         8        1-10, gaps
photo        320   800 / 200    3 to 15     4% to 22% (13-70 px)       10       sparse, 3..90
fewshot      256   300 / 100    1 to 5      12% to 45% (31-115 px)     24       1-24
==========  =====  ===========  ==========  =========================  =======  ==============

* ``small``: many small, non-overlapping shapes on flat gradient backgrounds; the class is
  the shape (the bundled set's eight shapes, too small to show their textures).
* ``photo``: backgrounds are random crops of the photographs that scikit-image ships
  (``skimage.data``; rescaled, flipped), with textured shapes pasted on them; the ten category
  ids are sparse (3, 7, 12, 18, 21, 30, 44, 57, 61, 90).  Objects may overlap, each keeps at
  least 60% of its pixels visible.
* ``fewshot``: a few hundred images, 24 classes: 8 shapes x 3 hue families (red, green, blue),
  so the class is shape *and* colour; muted backgrounds.

Numpy + Pillow (+ scikit-image for ``photo``); all three sets take about 25 s of CPU.  After
writing, each set's ``decodet data check`` summary is printed (the same function the CLI calls).
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from decodet.data.synthetic import CLASSES as SHAPES  # (id, name, shape fn, texture fn, rotates)
from decodet.data.synthetic import sample_pose

SETS = ("small", "photo", "fewshot")
_SET_CODES = {"small": 11, "photo": 12, "fewshot": 13}
_SPLIT_CODES = {"train": 0, "val": 1}
# scikit-image's bundled photographs that load without a download (no text, logos or drawings)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "grass", "gravel", "brick")


# ---------------------------------------------------------------------------- shapes

ShapeFn = Callable[[float, np.ndarray, np.ndarray], np.ndarray]


def _pentagon(R: float, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    inside = np.ones(u.shape, dtype=bool)
    apothem = R * math.cos(math.pi / 5)
    for k in range(5):
        a = 2 * math.pi * k / 5
        inside &= u * math.sin(a) - v * math.cos(a) <= apothem
    return inside


def _crescent(R: float, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u * u + v * v <= R * R) & ((u - 0.45 * R) ** 2 + v * v > (0.8 * R) ** 2)


def _plain(R: float, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.zeros(u.shape, dtype=bool)


def _bars(R: float, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.floor(v / max(2.0, R / 2.5)) % 2 == 0


@dataclass(frozen=True)
class ObjectClass:
    """One class: its COCO id and name, the shape and texture masks, and the hue range of its colour."""

    id: int
    name: str
    shape: ShapeFn
    texture: ShapeFn
    rotates: bool = True
    hues: tuple[float, float] | None = None  # None: any hue


_BASE = [ObjectClass(cid, name, shape, texture, rotates) for cid, name, shape, texture, rotates in SHAPES]
_EXTRA = [ObjectClass(0, "pentagon", _pentagon, _bars), ObjectClass(0, "crescent", _crescent, _plain)]
_PHOTO_IDS = (3, 7, 12, 18, 21, 30, 44, 57, 61, 90)
_HUES = {"red": (-0.05, 0.05), "green": (0.28, 0.38), "blue": (0.58, 0.68)}


@dataclass(frozen=True)
class SetSpec:
    """What a set draws: image side, split sizes, objects per image, object sizes, classes, background."""

    name: str
    image_size: int
    train: int
    val: int
    objects: tuple[int, int]  # inclusive range per image
    size_range: tuple[float, float]  # object size as a fraction of the image side, log-uniform
    classes: list[ObjectClass] = field(repr=False)
    background: str  # "gradient" | "photo" | "muted"
    min_visible: float  # each placed object keeps at least this fraction of its pixels visible (1: no overlap)


def set_spec(name: str, train: int | None = None, val: int | None = None) -> SetSpec:
    """The definition of set ``name`` (module docstring); ``train``/``val`` override the split sizes."""
    if name == "small":
        spec = SetSpec("small", 320, 600, 150, (20, 60), (0.02, 0.06), list(_BASE), "gradient", 1.0)
    elif name == "photo":
        classes = [
            ObjectClass(cid, c.name, c.shape, c.texture, c.rotates)
            for cid, c in zip(_PHOTO_IDS, _BASE + _EXTRA, strict=True)
        ]
        spec = SetSpec("photo", 320, 800, 200, (3, 15), (0.04, 0.22), classes, "photo", 0.6)
    elif name == "fewshot":
        classes = [
            ObjectClass(len(_HUES) * i + j + 1, f"{hue}_{c.name}", c.shape, _plain, c.rotates, hues)
            for i, c in enumerate(_BASE)
            for j, (hue, hues) in enumerate(_HUES.items())
        ]
        spec = SetSpec("fewshot", 256, 300, 100, (1, 5), (0.12, 0.45), classes, "muted", 0.6)
    else:
        raise ValueError(f"unknown set {name!r} (known: {', '.join(SETS)})")
    return SetSpec(**{**spec.__dict__, "train": spec.train if train is None else train,
                      "val": spec.val if val is None else val})  # fmt: skip


# ---------------------------------------------------------------------------- drawing


def _colour(rng: np.random.Generator, hues: tuple[float, float] | None, sat: tuple[float, float], val) -> np.ndarray:
    h = rng.uniform(0, 1) if hues is None else rng.uniform(*hues) % 1.0
    return np.array(colorsys.hsv_to_rgb(h, rng.uniform(*sat), rng.uniform(*val)), dtype=np.float32) * 255


def _gradient(S: int, rng: np.random.Generator, sat: tuple[float, float]) -> np.ndarray:
    """Two colours blended across the image plus coarse blotches, float32 [S, S, 3]."""
    a, b = _colour(rng, None, sat, (0.2, 0.85)), _colour(rng, None, sat, (0.2, 0.85))
    cells = int(rng.integers(3, 7))
    g = np.linspace(0, 1, cells, dtype=np.float32)
    phi = rng.uniform(0, 2 * math.pi)
    t = np.clip(0.5 + (g[None, :] - 0.5) * math.cos(phi) + (g[:, None] - 0.5) * math.sin(phi), 0, 1)[..., None]
    coarse = a + (b - a) * t + rng.standard_normal((cells, cells, 3)).astype(np.float32) * rng.uniform(5, 25)
    coarse_img = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8))
    return np.asarray(coarse_img.resize((S, S), Image.BILINEAR), dtype=np.float32).copy()


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    from skimage import data  # the bench extra; only the photo set needs it

    out = []
    for name in PHOTOS:
        img = np.asarray(getattr(data, name)())
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        out.append(np.ascontiguousarray(img[..., :3].astype(np.uint8)))
    return tuple(out)


def _photo_crop(S: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (35-100% of the shorter side) of a random photograph, resized to S, maybe flipped."""
    photos = _photos()
    img = photos[int(rng.integers(len(photos)))]
    h, w = img.shape[:2]
    side = int(min(h, w) * rng.uniform(0.35, 1.0))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(img[y : y + side, x : x + side]).resize((S, S), Image.BILINEAR)
    out = np.asarray(crop, dtype=np.float32).copy()
    return out[:, ::-1].copy() if rng.uniform() < 0.5 else out


def _sample_pose(cls: ObjectClass, S: int, size_range: tuple[float, float], rng: np.random.Generator):
    """((top, left), shape mask, texture mask) of one object, at most ~15% outside the image, or None when too small."""
    return sample_pose(cls.shape, cls.texture, cls.rotates, S, size_range, rng, margin=0.35, min_pixels=10)


def render(spec: SetSpec, rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """One image of set ``spec``: uint8 [S, S, 3] and its COCO objects (``category_id``, ``bbox``, ``area``)."""
    S = spec.image_size
    if spec.background == "photo":
        canvas = _photo_crop(S, rng)
    else:
        canvas = _gradient(S, rng, (0.0, 0.5) if spec.background == "gradient" else (0.0, 0.15))
    owner = np.full((S, S), -1, dtype=np.int32)
    full: list[int] = []  # pixels of each placed object
    visible: list[int] = []  # its pixels still on top
    placed: list[tuple[int, tuple[int, int, int, int]]] = []
    wanted = int(rng.integers(spec.objects[0], spec.objects[1] + 1))
    for _ in range(wanted):
        for _attempt in range(30 if placed else 300):
            k = int(rng.integers(len(spec.classes)))
            pose = _sample_pose(spec.classes[k], S, spec.size_range, rng)
            if pose is None:
                continue
            (y0, x0), mask, texture = pose
            region = owner[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
            covered = region[mask]
            covered = covered[covered >= 0]
            if spec.min_visible >= 1.0 and covered.size:
                continue
            lost = np.bincount(covered, minlength=len(full)) if covered.size else np.zeros(len(full), np.int64)
            if np.any(np.asarray(visible) - lost < spec.min_visible * np.asarray(full)):
                continue
            _paint(canvas, (y0, x0), mask, texture, spec.classes[k], spec.background, rng)
            region[mask] = len(full)
            full.append(int(mask.sum()))
            visible = [v - int(lo) for v, lo in zip(visible, lost)] + [full[-1]]
            ys, xs = np.nonzero(mask)
            placed.append((k, (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)))
            break
    canvas += rng.standard_normal((S, S, 1), dtype=np.float32) * rng.uniform(1.5, 6.0)
    areas = np.bincount(owner[owner >= 0], minlength=len(placed))
    objects = [
        {
            "category_id": spec.classes[k].id,
            "bbox": [float(a), float(b), float(c - a), float(d - b)],
            "area": float(areas[i]),
        }  # fmt: skip
        for i, (k, (a, b, c, d)) in enumerate(placed)
    ]
    return np.clip(canvas, 0, 255).astype(np.uint8), objects


def _paint(canvas, origin, mask, texture, cls: ObjectClass, background: str, rng) -> None:
    y0, x0 = origin
    region = canvas[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
    under = region[mask].mean(axis=0)
    sat = (0.55, 1.0) if cls.hues is not None else (0.4, 1.0)
    base = _colour(rng, cls.hues, sat, (0.45, 1.0))
    for _ in range(8):  # stand out from what lies underneath
        if np.linalg.norm(base - under) > 80:
            break
        base = _colour(rng, cls.hues, sat, (0.45, 1.0))
    second = base * 0.35 if rng.uniform() < 0.5 else base * 0.35 + 255 * 0.65
    colours = np.where(texture[mask][:, None], second, base)
    shade = 1 + rng.uniform(-0.15, 0.15) * np.linspace(-1, 1, mask.shape[1], dtype=np.float32)
    region[mask] = colours * np.broadcast_to(shade[None, :], mask.shape)[mask][:, None]


# ---------------------------------------------------------------------------- files


def write_set(
    name: str, out: str | Path, seed: int = 0, train: int | None = None, val: int | None = None, overwrite: bool = False
) -> Path:
    """Write set ``name`` to ``out`` (built in a temp folder beside it, renamed when complete); returns ``out``.

    An existing ``out`` written with the same arguments (its ``make_sets.json``) is kept as it is;
    one written with others is an error unless ``overwrite``.
    """
    spec = set_spec(name, train, val)
    out = Path(out)
    stamp = {"set": name, "seed": seed, "train": spec.train, "val": spec.val, "version": 1}
    if out.exists():
        try:
            same = json.loads((out / "make_sets.json").read_text()) == stamp
        except (OSError, ValueError):
            same = False
        if same and not overwrite:
            return out
        if not overwrite:
            raise SystemExit(f"{out} exists and was not written with {stamp} (pass --overwrite to replace it)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "annotations").mkdir(parents=True)
    for split, count in (("train", spec.train), ("val", spec.val)):
        if count:
            _write_split(tmp, spec, split, count, seed)
    (tmp / "make_sets.json").write_text(json.dumps(stamp) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _write_split(root: Path, spec: SetSpec, split: str, count: int, seed: int) -> None:
    (root / split).mkdir()
    images, annotations = [], []
    for i in range(count):
        rng = np.random.default_rng([seed, _SET_CODES[spec.name], _SPLIT_CODES[split], i])
        pixels, objects = render(spec, rng)
        file_name = f"{i + 1:06d}.jpg"
        Image.fromarray(pixels).save(root / split / file_name, quality=90)
        images.append({"id": i + 1, "file_name": file_name, "width": spec.image_size, "height": spec.image_size})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **obj, "iscrowd": 0})
    content = {
        "info": {"description": f"decodet convergence benchmark set '{spec.name}', {split} split, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c.id, "name": c.name, "supercategory": "shape"} for c in spec.classes],
    }
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to hold one sub-folder per set")
    p.add_argument("--which", default=",".join(SETS), help=f"comma-separated sets (default: {','.join(SETS)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, help="override every set's train size (tests, quick looks)")
    p.add_argument("--val", type=int, help="override every set's val size")
    p.add_argument("--overwrite", action="store_true", help="replace sets written with other arguments")
    p.add_argument("--no-check", action="store_true", help="do not print the data-check summaries")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.which.split(",") if n.strip()]
    for name in names:
        set_spec(name)  # unknown names fail before anything is written
    from decodet.data.check import check_dataset  # what `decodet data check` prints

    failed = 0
    for name in names:
        path = write_set(name, Path(args.out) / name, args.seed, args.train, args.val, args.overwrite)
        print(f"== {name}: {path}")
        if not args.no_check:
            result = check_dataset(path)
            print(result.text)
            failed += bool(result.problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
