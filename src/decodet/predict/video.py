"""``decodet predict`` on a video (or a folder of frames): a drawn video and per-frame JSON Lines.

Writes into ``out_dir``, named after the input's stem:

- ``<stem>.mp4``: the analysed frames with their boxes drawn, same width and height, at the
  source frame rate divided by ``stride`` (so it plays at real speed);
- ``<stem>.jsonl``: one line per analysed frame, in order::

      {"frame": 12, "time": 0.48, "detections": [
          {"bbox": [x, y, w, h], "score": 0.91, "category_id": 3, "category": "car"}, ...]}

  ``frame`` is the index in the source (from 0), ``time`` its presentation time in seconds;
  ``bbox`` is COCO's ``[x, y, w, h]`` in source pixels (not clipped, as ``predictions.json``).

Frames are decoded, detected, drawn and encoded a batch at a time, so memory does not grow
with the video's length.  Both files are written to temporary names and renamed at the end.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from decodet.errors import DecodetError
from decodet.inference.draw import draw_detections
from decodet.inference.inputs import ImageItem, iter_images, to_uint8_chw
from decodet.inference.video import VideoWriter, is_video, probe, read_frames
from decodet.io.atomic import atomic_path
from decodet.runtime.detector import Detector
from decodet.utils.console import progress

log = logging.getLogger(__name__)


def frame_record(det: dict[str, Any]) -> dict[str, Any]:
    """One JSON Lines record (module docstring) from a :class:`Detector` result."""
    detections = [
        {"bbox": [x0, y0, x1 - x0, y1 - y0], "score": score, "category_id": int(label), "category": name}
        for (x0, y0, x1, y1), score, label, name in zip(
            det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(), det["names"]
        )
    ]
    return {"frame": int(det["frame"]), "time": round(float(det["time"]), 6), "detections": detections}


def folder_frames(source: Any, fps: float, stride: int = 1) -> Iterator[ImageItem]:
    """Images of a folder or glob (sorted by name) as video frames at ``fps``, every ``stride``-th.

    Every frame must have the first frame's size (a video has one size).
    """
    first: tuple[int, int] | None = None
    for index, item in enumerate(iter_images(source)):
        if index % stride:
            continue
        image = to_uint8_chw(item.image).permute(1, 2, 0).numpy()
        size = (int(image.shape[0]), int(image.shape[1]))
        if first is None:
            first = size
        elif size != first:
            raise DecodetError(
                f"frame is {size[1]}x{size[0]} but the first frame is {first[1]}x{first[0]}; "
                "frames of a video must share one size",
                item.path,
            )
        yield ImageItem(image, item.path, index, index / fps)


def predict_video(
    source: str | os.PathLike,
    detector: Detector,
    out_dir: str | os.PathLike,
    stride: int = 1,
    fps: float | None = None,
    batch_size: int = 1,
    draw: bool = True,
) -> tuple[Path | None, Path]:
    """Run ``detector`` over a video file, or a folder/glob of frames at ``fps`` (default 30).

    Returns the paths of the drawn video (``None`` when ``draw`` is false) and the JSON Lines file.
    """
    if stride < 1:
        raise DecodetError(f"--stride must be at least 1, got {stride}")
    out = Path(out_dir)
    if is_video(source):
        if fps is not None:
            raise DecodetError("--fps is for --as-video frame folders; a video file keeps its own rate", source)
        info = probe(source)
        rate, total = info.fps, (-(-info.frames // stride) if info.frames else None)
        frames: Iterator[ImageItem] = (
            ImageItem(f.image, str(source), f.index, f.time) for f in read_frames(source, stride)
        )
        stem = Path(source).stem
    else:
        rate, total = Fraction(fps or 30.0).limit_denominator(1001 * 1000), None
        frames = folder_frames(source, float(rate), stride)
        stem = Path(str(source).rstrip("/*")).name or "frames"
    out.mkdir(parents=True, exist_ok=True)
    video_path = out / f"{stem}.mp4" if draw else None
    jsonl_path = out / f"{stem}.jsonl"

    # The detector pulls frames lazily; keep each frame until its result comes back (at most one batch).
    pending: deque[ImageItem] = deque()

    def remember(items: Iterator[ImageItem]) -> Iterator[ImageItem]:
        for item in items:
            pending.append(item)
            yield item

    writer: VideoWriter | None = None
    n = 0
    with atomic_path(jsonl_path) as tmp_jsonl, open(tmp_jsonl, "w", encoding="utf-8") as lines:
        try:
            bar = progress(detector.stream(remember(frames), batch_size=batch_size), total=total, desc="video")
            start = time.monotonic()
            for det in bar:
                item = pending.popleft()
                lines.write(json.dumps(frame_record(det)) + "\n")
                if video_path is not None:
                    image = np.asarray(draw_detections(item.image, det, detector.class_names, score_threshold=0.0))
                    if writer is None:
                        writer = VideoWriter(video_path, rate / stride, image.shape[1], image.shape[0])
                    writer.write(image)
                n += 1
                bar.set_postfix(**{"frames/s": n / max(time.monotonic() - start, 1e-9), "objects": len(det["scores"])})
        except BaseException as exc:
            if writer is not None:
                writer.close(exc)
            raise
        if writer is not None:
            writer.close()
    log.info("%d frames -> %s%s", n, jsonl_path, f", {video_path}" if video_path else "")
    return video_path, jsonl_path
