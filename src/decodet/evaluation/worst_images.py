"""The images a detector gets most wrong, drawn: detections (``decodet.inference.draw``) plus the
missed ground-truth boxes in white, ranked by missed + false boxes (see :mod:`decodet.evaluation.analysis`)."""

from __future__ import annotations

import csv
import io
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.utils import draw_bounding_boxes

from decodet.inference.draw import draw_detections, save_image_atomic
from decodet.io.atomic import atomic_write_text

log = logging.getLogger(__name__)

INDEX_CSV = "index.csv"
MISSED_COLOR = (255, 255, 255)


def worst_image_ids(errors: dict[int, tuple[int, int]], num: int) -> list[int]:
    """Up to ``num`` image ids with the most missed + false boxes (at least one), worst first;
    ties go to more missed boxes, then the lower id."""
    ranked = sorted((i for i, (m, f) in errors.items() if m + f > 0), key=lambda i: (-sum(errors[i]), -errors[i][0], i))
    return ranked[:num]


def write_worst_images(
    out_dir: Path, ev: Any, conf: Any, images_dir: Path, score_threshold: float, num: int
) -> list[Path]:
    """Draw the worst ``num`` images of a ``COCOeval`` into ``out_dir`` (emptied first) with an
    ``index.csv`` (rank, image_id, file_name, missed, false); returns the images written.

    Detections scoring at least ``score_threshold`` are drawn in their class colour; missed
    ground-truth boxes in white, labelled ``missed <class>``. An unreadable image is skipped
    with a warning.
    """
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a previous evaluation's images would mix with these
    out_dir.mkdir(parents=True)
    names = dict(zip(conf.category_ids, conf.names))
    written, index = [], []
    for rank, image_id in enumerate(worst_image_ids(conf.errors, num), start=1):
        info = ev.cocoGt.imgs[image_id]
        src = images_dir / info["file_name"]
        try:
            with Image.open(src) as im:
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            log.warning("worst images: cannot read %s (%s); skipped", src, e)
            continue
        dets = [d for d in ev.cocoDt.imgToAnns.get(image_id, []) if d["score"] >= score_threshold]
        drawn = draw_detections(image, _as_xyxy(dets), names, score_threshold)
        drawn = _draw_missed(drawn, ev.cocoGt.loadAnns(conf.missed[image_id]), names)
        missed, false = conf.errors[image_id]
        path = out_dir / f"{rank:03d}_{Path(info['file_name']).stem}_missed{missed}_false{false}.jpg"
        save_image_atomic(drawn, path)
        written.append(path)
        index.append([rank, image_id, info["file_name"], missed, false])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["rank", "image_id", "file_name", "missed", "false"])
    writer.writerows(index)
    atomic_write_text(out_dir / INDEX_CSV, buf.getvalue())
    return written


def _as_xyxy(anns: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """COCO annotations (``bbox`` xywh) -> ``{"boxes" [N, 4] xyxy, "scores" [N], "labels" [N] category ids}``."""
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    scores = torch.tensor([float(a.get("score", 1.0)) for a in anns], dtype=torch.float32)
    labels = torch.tensor([int(a["category_id"]) for a in anns], dtype=torch.int64)
    return {"boxes": boxes, "scores": scores, "labels": labels}


def _draw_missed(image: Image.Image, missed: list[dict[str, Any]], names: dict[int, str]) -> Image.Image:
    """Overlay ground-truth boxes (COCO annotations) in white, labelled ``missed <class>``."""
    if not missed:
        return image
    boxes = _as_xyxy(missed)["boxes"]
    w, h = image.size
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h - 1)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    pixels = draw_bounding_boxes(
        pixels,
        boxes,
        labels=[f"missed {names[a['category_id']]}" for a in missed],
        colors=[MISSED_COLOR] * len(missed),
        width=max(1, round(max(h, w) / 300)),
        fill_labels=True,  # black text on a white tag, as draw_detections does for detections
    )
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())
