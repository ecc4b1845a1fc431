"""COCO AP of any inference runner: the accuracy column of ``decodet benchmark`` and the AP
ranking of the int8 sensitivity sweep.

A *runner* is what every backend offers (``Detector.predict_batch``, ``DeployModel``, an ONNX
session wrapped to tensors): ``run(images [B, 3, H, W] preprocessed, orig_sizes [B, 2]) ->
(boxes [B, K, 4] xyxy original pixels, scores [B, K], labels [B, K] category ids)``.  Images
are read and preprocessed as ``Detector`` does (:func:`decodet.deploy.inputs.preprocess`: one
fixed size, the deploy mean/std), so every backend is scored on the same inputs through the
same COCO evaluation as ``decodet eval`` (:func:`decodet.engine.evaluator.evaluate_coco`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from decodet.data.images import load_image
from decodet.data.spec import resolve_data
from decodet.deploy.inputs import preprocess
from decodet.engine.evaluator import evaluate_coco
from decodet.errors import DecodetError
from decodet.io.files import read_json

Runner = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


class RunnerEvaluator:
    """``evaluator(run, imgsz, mean, std) -> COCO stats`` on one split of a dataset.

    Args:
        data: a dataset folder or ``data.yaml`` (:func:`decodet.data.spec.resolve_data`).
        split: which split's images and ground truth (default ``val``).
        limit: score only the first ``limit`` images of the split (``None``: all).
        batch_size: images per runner call (the last call is padded to it with copies).
    """

    def __init__(
        self, data: str | os.PathLike, split: str = "val", limit: int | None = None, batch_size: int = 8
    ) -> None:
        spec = resolve_data(data)
        self.split = spec.split(split)
        gt = read_json(self.split.ann_file)
        images = list(gt.get("images", []))
        if limit is not None:
            images = images[: max(1, int(limit))]
        if not images:
            raise DecodetError(f"split {split!r} has no images", self.split.ann_file)
        self.images = [(int(im["id"]), Path(self.split.images_dir) / im["file_name"]) for im in images]
        self.batch_size = max(1, int(batch_size))

    def __call__(
        self, run: Runner, imgsz: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]
    ) -> dict[str, float]:
        dets: dict[int, dict[str, Any]] = {}
        for start in range(0, len(self.images), self.batch_size):
            chunk = self.images[start : start + self.batch_size]
            tensors, sizes = zip(*(preprocess(load_image(path), imgsz, mean, std) for _, path in chunk))
            x, s = torch.stack(tensors), torch.tensor(sizes, dtype=torch.float32)
            if len(chunk) < self.batch_size:  # pad the last batch: compiled runners see one batch size
                pad = self.batch_size - len(chunk)
                x, s = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)]), torch.cat([s, s[-1:].expand(pad, -1)])
            boxes, scores, labels = run(x, s)
            for i, (image_id, _) in enumerate(chunk):
                dets[image_id] = {"boxes": boxes[i].float(), "scores": scores[i].float(), "labels": labels[i].long()}
        return evaluate_coco(self.split.ann_file, dets, image_ids=[i for i, _ in self.images])
