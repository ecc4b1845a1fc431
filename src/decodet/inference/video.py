"""Video in and out with PyAV (FFmpeg): decode frame by frame, encode H.264 MP4.

Reading is lazy (one decoded frame at a time), so memory does not grow with the video.  A file
FFmpeg cannot open is a one-line :class:`DecodetError` naming it.  A truncated file yields the
frames that decode, then logs a warning (a decode error part-way, or fewer frames than the
container declares); an MP4 cut before its end-of-file ``moov`` index cannot be opened: corrupt.

Frames are RGB ``uint8 [H, W, 3]`` numpy arrays (what :func:`~decodet.inference.inputs.iter_images`
takes).  PyAV is the optional ``video`` extra (``pip install 'decodet[video]'``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from decodet.errors import DecodetError
from decodet.io.atomic import atomic_path

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".wmv", ".flv", ".3gp")
DEFAULT_FPS = 30.0  # when a file carries no usable frame rate


def is_video(source: Any) -> bool:
    """True for a path whose suffix is a video container's (the file need not exist yet)."""
    return isinstance(source, str | os.PathLike) and Path(source).suffix.lower() in VIDEO_SUFFIXES


def _av() -> ModuleType:
    try:
        import av
    except ImportError:
        raise DecodetError("video needs PyAV: pip install 'decodet[video]'") from None
    return av


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream (``frames`` 0: not declared)."""

    fps: Fraction
    width: int
    height: int
    frames: int


@dataclass(frozen=True)
class Frame:
    """One decoded frame: ``image`` RGB ``uint8 [H, W, 3]``, ``index`` from 0, ``time`` in seconds."""

    image: np.ndarray
    index: int
    time: float


def _open(path: Path) -> Any:
    av = _av()
    if not path.is_file():
        raise DecodetError("video file not found", path)
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:  # noqa: B014 - FFmpegError is not an OSError
        raise DecodetError(f"cannot open as a video ({_reason(exc)})", path) from None
    if not container.streams.video:
        container.close()
        raise DecodetError("holds no video stream", path)
    stream = container.streams.video[0]
    if stream.codec_context is None or not stream.codec_context.width:
        container.close()
        raise DecodetError("video stream cannot be decoded (unsupported codec?)", path)
    return container


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return " ".join(str(text).split())


def _info(stream: Any) -> VideoInfo:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = Fraction(rate) if rate else Fraction(DEFAULT_FPS)
    return VideoInfo(fps, int(stream.codec_context.width), int(stream.codec_context.height), int(stream.frames or 0))


def probe(path: str | os.PathLike) -> VideoInfo:
    """Frame rate, size and declared frame count of a video file (nothing decoded)."""
    with _open(Path(path)) as container:
        return _info(container.streams.video[0])


def read_frames(path: str | os.PathLike, stride: int = 1) -> Iterator[Frame]:
    """Decode ``path`` lazily, yielding every ``stride``-th frame (indices 0, K, 2K, ...).

    Raises :class:`DecodetError` when the file cannot be opened or not a single frame
    decodes; logs a warning and stops early when the file is truncated or damaged.
    """
    if stride < 1:
        raise DecodetError(f"stride must be at least 1, got {stride}")
    path = Path(path)
    av = _av()
    with _open(path) as container:
        stream = container.streams.video[0]
        info = _info(stream)
        index, problem = 0, None
        for frame in _decode(av, container, stream):
            if isinstance(frame, BaseException):
                problem = _reason(frame)
                break
            if index % stride == 0:
                time = float(frame.time) if frame.time is not None else index / float(info.fps)
                yield Frame(frame.to_ndarray(format="rgb24"), index, time)
            index += 1
    if index == 0:
        raise DecodetError(f"no frame could be decoded ({problem or 'empty stream'})", path)
    if problem is None and info.frames and index < info.frames:
        problem = f"the container declares {info.frames} frames"
    if problem is not None:
        log.warning("%s: video is truncated or damaged; kept the %d frames that decode (%s)", path, index, problem)


def _decode(av: ModuleType, container: Any, stream: Any) -> Iterator[Any]:
    """Frames of ``stream``; on a demux or decode error, flush what the decoder holds, then yield the error.

    Decoding packet by packet (not ``container.decode``) keeps the frames the decoder has
    buffered when a later packet is damaged.
    """
    try:
        for packet in container.demux(stream):
            yield from stream.decode(packet)  # the last, empty packet flushes the decoder
    except av.error.FFmpegError as exc:  # noqa: B014
        try:
            yield from stream.decode(None)
        except av.error.FFmpegError:  # noqa: B014
            pass
        yield exc


class VideoWriter:
    """Encode RGB frames to an H.264 MP4 at ``fps``; the file appears (atomically) on :meth:`close`.

    >>> with VideoWriter("out.mp4", fps=25, width=640, height=480) as w:
    ...     w.write(rgb_uint8_hw3)

    Odd widths or heights use 4:4:4 chroma (4:2:0 needs even sizes) so the size is kept.
    On an exception inside the ``with`` block nothing is written.
    """

    def __init__(self, path: str | os.PathLike, fps: float | Fraction, width: int, height: int) -> None:
        av = _av()
        self.path = Path(path)
        self.width, self.height = int(width), int(height)
        self.frames = 0
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        rate = Fraction(fps).limit_denominator(1001 * 1000)
        try:
            self._container = av.open(str(self._tmp), "w", format="mp4", options={"movflags": "+faststart"})
            self._stream = self._container.add_stream("libx264", rate=rate)
        except av.error.FFmpegError as exc:  # noqa: B014
            self._atomic.__exit__(type(exc), exc, None)
            raise DecodetError(f"cannot write video ({_reason(exc)})", self.path) from None
        self._stream.width, self._stream.height = self.width, self.height
        even = self.width % 2 == 0 and self.height % 2 == 0
        self._stream.pix_fmt = "yuv420p" if even else "yuv444p"
        self._stream.options = {"crf": "20"}

    def write(self, image: np.ndarray) -> None:
        """Append one RGB ``uint8 [H, W, 3]`` frame of the writer's size."""
        if image.shape != (self.height, self.width, 3):
            raise DecodetError(
                f"frame {self.frames} is {list(image.shape)}, this video is [{self.height}, {self.width}, 3]", self.path
            )
        frame = _av().VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        self._container.mux(self._stream.encode(frame))
        self.frames += 1

    def close(self, error: BaseException | None = None) -> None:
        """Flush the encoder and move the file into place (or drop it when ``error`` is given)."""
        if self._container is None:
            return
        try:
            if error is None:
                self._container.mux(self._stream.encode(None))
            self._container.close()
        finally:
            self._container = None
            if error is None:
                self._atomic.__exit__(None, None, None)
            else:
                self._atomic.__exit__(type(error), error, None)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.close(exc)
