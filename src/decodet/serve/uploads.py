"""Request bodies -> images: size limit, multipart or raw body, guarded decoding.

Every problem is an :class:`ApiError` carrying the HTTP status and a one-line message the
client sees as ``{"error": message}``:

    413  the body is over the upload limit (refused before it is read in full)
    400  empty body, no file field, corrupt or truncated image, too many pixels declared
    415  the bytes are not an image format Pillow reads

Decoding gives the same pixels as :func:`decodet.data.images.load_image` (EXIF orientation,
any mode -> RGB), so the service answers what ``decodet predict`` answers for the same file.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request

from decodet.data.images import to_rgb


class ApiError(Exception):
    """A client-side problem: HTTP ``status``, one-line ``message``, optional extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing (413) as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, f"bad Content-Length header {declared!r}") from None
        if size > limit:
            raise ApiError(413, _too_large(size, limit))
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ApiError(413, _too_large(total, limit, at_least=True))
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before sending the whole body") from None
    return b"".join(chunks)


def _too_large(size: int, limit: int, at_least: bool = False) -> str:
    more = "over " if at_least else ""
    return f"upload of {more}{size / 2**20:.2f} MB exceeds the limit of {limit / 2**20:.2f} MB"


async def image_bytes(request: Request, limit: int) -> tuple[bytes, str | None]:
    """The image's bytes and file name from a multipart form (field ``file``, or the only
    file) or from a raw body (any other content type)."""
    body = await read_body(request, limit)
    ctype = request.headers.get("content-type", "").lower()
    if not ctype.startswith("multipart/form-data"):
        if not body:
            raise ApiError(400, "empty request body: send an image as the body or as a multipart field 'file'")
        return body, None

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
    except Exception as exc:  # python-multipart's errors for malformed forms
        raise ApiError(400, f"malformed multipart form ({type(exc).__name__}: {exc})") from None
    try:
        files = [v for v in form.values() if isinstance(v, UploadFile)]
        field = form.get("file")
        upload = field if isinstance(field, UploadFile) else (files[0] if len(files) == 1 else None)
        if upload is None:
            raise ApiError(400, "multipart form has no file field 'file'")
        data = await upload.read()
        if not data:
            raise ApiError(400, f"uploaded file {upload.filename!r} is empty")
        return data, upload.filename
    finally:
        await form.close()


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> upright 8-bit RGB image.  The declared size is checked from the header
    before any pixel is decoded (decompression bombs get 400 without costing memory)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ApiError(
                        400,
                        f"image declares {w}x{h} = {w * h / 1e6:.1f} megapixels, over the limit of "
                        f"{max_pixels / 1e6:.1f} (refused before decoding)",
                    )
                if w < 1 or h < 1:
                    raise ApiError(400, f"image has no pixels ({w}x{h})")
                img.load()
                try:
                    img = ImageOps.exif_transpose(img)
                except Exception:  # a malformed EXIF block leaves the image as stored
                    pass
                return to_rgb(img)
    except ApiError:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow itself refuses, in ``Image.open``, sizes far past its own limit
        raise ApiError(
            400,
            f"image declares too many pixels, over the limit of {max_pixels / 1e6:.1f} megapixels "
            f"(refused before decoding: {exc})",
        ) from None
    except UnidentifiedImageError:
        raise ApiError(415, "not an image: Pillow cannot identify the format of the uploaded bytes") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # Pillow's ways to say corrupt/truncated
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ApiError(400, f"corrupt or truncated image ({reason})") from None
