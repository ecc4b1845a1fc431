"""``decodet predict``: run a Detector over files, draw the boxes, write COCO results.

Writes into ``out_dir``: one drawn image per input (same name, ``.jpg``), and
``predictions.json`` in the COCO *results* format (``image_id, category_id, bbox [x, y,
w, h], score``) that :func:`decodet.evaluate_coco` reads.  Image ids come from a COCO
annotation file when one is given (matched by file name), else 1..N in input order
(``images.json`` maps ids to files).  Both JSON files are written atomically.

A video file, or a folder of frames with ``as_video``, goes to
:func:`~decodet.predict.video.predict_video` instead: a drawn video and per-frame JSON Lines.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from decodet.data.images import load_image
from decodet.errors import DecodetError
from decodet.inference.draw import draw_detections, save_image_atomic
from decodet.inference.video import is_video
from decodet.io.atomic import atomic_write_text
from decodet.io.coco_results import detections_to_coco
from decodet.predict.video import predict_video
from decodet.runtime.detector import Detector
from decodet.runtime.options import RunOptions
from decodet.utils.console import progress

log = logging.getLogger(__name__)


def _ids_from_annotations(ann_file: str | os.PathLike) -> dict[str, int]:
    try:
        data = json.loads(Path(ann_file).read_text())
        return {Path(im["file_name"]).name: int(im["id"]) for im in data["images"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DecodetError(f"cannot read image ids from this COCO file ({exc})", ann_file) from None


def predict_to_folder(
    source: Any,
    weights: str | os.PathLike,
    out_dir: str | os.PathLike = "runs/predict",
    options: RunOptions | None = None,
    ann_file: str | os.PathLike | None = None,
    draw: bool = True,
    stride: int = 1,
    as_video: bool = False,
    fps: float | None = None,
    **kwargs: Any,
) -> Path:
    """Detect objects in ``source`` (image file, folder or glob; a video file; or a folder of
    frames with ``as_video``, at ``fps``); returns ``out_dir``.  ``stride`` K: every K-th frame
    of a video.  ``options`` (``kwargs``: its fields, replacing them): how the
    :class:`Detector` runs."""
    o = RunOptions.build(options, **kwargs)
    out = Path(out_dir)
    video = is_video(source) or as_video or fps is not None
    if not video and stride != 1:
        raise DecodetError("--stride applies to videos and --as-video frame folders only")
    if video and ann_file:
        raise DecodetError("--ann applies to image inputs only (a video gets per-frame JSON Lines)")
    detector = Detector(weights, options=o)
    if video:
        predict_video(source, detector, out, stride=stride, fps=fps, batch_size=o.batch_size, draw=draw)
        return out
    out.mkdir(parents=True, exist_ok=True)
    known = _ids_from_annotations(ann_file) if ann_file else None
    results: list[dict[str, Any]] = []
    index: list[dict[str, Any]] = []
    bar = progress(detector.stream(source), desc="predict")
    for n, det in enumerate(bar, start=1):
        path = Path(det["path"]) if det.get("path") else Path(f"image_{n:06d}.jpg")
        image_id = known.get(path.name, None) if known is not None else n
        if image_id is None:
            log.warning("%s is not in %s: left out of predictions.json", path, ann_file)
        else:
            index.append({"id": image_id, "file_name": str(path)})
            results.extend(detections_to_coco({image_id: det}, max_dets=None))
        if draw and det.get("path"):
            drawn = draw_detections(load_image(path), det, detector.class_names, score_threshold=o.score_threshold)
            save_image_atomic(drawn, out / f"{path.stem}.jpg")
        bar.set_postfix(objects=len(det["scores"]))
    atomic_write_text(out / "predictions.json", json.dumps(results))
    atomic_write_text(out / "images.json", json.dumps(index, indent=1))
    log.info("%d images, %d detections -> %s", len(index), len(results), out)
    return out
