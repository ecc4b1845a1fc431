"""Image decoding: any file Pillow reads -> an upright 8-bit RGB ``PIL.Image``.

Every image enters decodet through :func:`load_image`, so training, evaluation and
inference see the same pixels:

- EXIF orientation is applied (phone photos come out upright);
- grey, palette, CMYK, 1-bit and other modes are converted to RGB;
- transparency (RGBA, LA, palette with a transparent colour) is composited on neutral grey;
- 16-bit and 32-bit integer images are scaled into 0..255 (not clipped), float images too;
- images over ``max_pixels`` are refused before their pixels are decoded.

Every failure (missing file, empty file, not an image, truncated data, too large) is a
:class:`~decodet.errors.DecodetError` ``"cannot read image: <reason>"`` naming the file.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from decodet.errors import DecodetError

logger = logging.getLogger(__name__)

# ~134 megapixels (e.g. 16k x 8k): about 400 MB as 8-bit RGB, far beyond any detector input.
DEFAULT_MAX_PIXELS = 2**27

# Transparent pixels become this colour: mid grey, neither object-like black nor white.
BACKGROUND_GREY = (128, 128, 128)


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``path`` (any format Pillow reads) into an upright ``"RGB"`` image (module docstring);
    ``max_pixels`` is the decompression-bomb guard."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DecodetError("cannot read image: file not found", path) from None
    except OSError as e:
        raise DecodetError(f"cannot read image: {e.strerror or e}", path) from None
    if path.is_dir():
        raise DecodetError("cannot read image: is a folder, not a file", path)
    if size == 0:
        raise DecodetError("cannot read image: empty file (0 bytes)", path)

    try:
        with warnings.catch_warnings():
            # We enforce our own limit below; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise DecodetError(
                        f"cannot read image: {w}x{h} is {w * h / 1e6:.0f} megapixels, over the "
                        f"limit of {max_pixels / 1e6:.0f} (pass a larger max_pixels if intended)",
                        path,
                    )
                img.load()
                img = _upright(img, path)
                return to_rgb(img)
    except DecodetError:
        raise
    except Image.DecompressionBombError as e:
        raise DecodetError(f"cannot read image: too large ({e})", path) from None
    except UnidentifiedImageError:
        raise DecodetError("cannot read image: not an image file (unknown format)", path) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports truncated and corrupt data as OSError ("image file is truncated ..."),
        # some plugins as SyntaxError/ValueError/EOFError.
        reason = str(e).strip() or type(e).__name__
        raise DecodetError(f"cannot read image: corrupt or truncated data ({reason})", path) from None


def _upright(img: Image.Image, path: Path) -> Image.Image:
    """Apply the EXIF orientation tag; a malformed EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as e:  # broken metadata must not make a good image unreadable
        logger.debug("%s: ignoring unreadable EXIF orientation (%s)", path, e)
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to 8-bit ``"RGB"`` (module docstring), e.g. a ``PIL.Image``
    passed to a detector."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(img), mode)).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
    if mode == "P" and img.palette is not None and img.palette.mode == "RGBA":
        has_alpha = True
    if has_alpha:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, BACKGROUND_GREY)
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img if img.mode == "RGB" else img.convert("RGB")


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Map a high-bit-depth single-channel array to uint8 without clipping.

    ``I;16*`` modes are 16-bit by definition: divided by 257 (65535 -> 255). 32-bit integer
    (``I``) images holding 0..255 or 0..65535 are read as 8- or 16-bit data; anything else,
    and float (``F``) images outside [0, 1], are min-max stretched.
    """
    a = a.astype(np.float64)
    if mode.startswith("I;16"):
        out = a / 257.0
    else:
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            out = a * 255.0
        elif mode == "I" and lo >= 0 and hi <= 255:
            out = a
        elif mode == "I" and lo >= 0 and hi <= 65535:
            out = a / 257.0
        else:
            out = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    out = np.nan_to_num(out, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
