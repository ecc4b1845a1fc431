"""Evaluation API: COCO box AP of a model on a dataset, or of a checkpoint on a dataset split.

:func:`evaluate` runs a model over a dataset (every process its shard under ``torchrun``), post-processes
(:func:`~decodet.models.postprocess.postprocess`), maps the boxes back to the original images and scores them
with :class:`~decodet.evaluation.evaluator.CocoEvaluator`. :func:`evaluate_checkpoint` does the same for a
checkpoint with its preset's evaluation transform (``decodet eval``). The trainer calls :func:`evaluate` after
its epochs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from decodet.config import ModelConfig, input_normalized
from decodet.data.coco import CocoDetection
from decodet.data.spec import resolve_data
from decodet.data.transforms import build_transforms, collate
from decodet.errors import DecodetError
from decodet.evaluation.evaluator import CocoEvaluator, merge_detections
from decodet.io.atomic import atomic_write_text
from decodet.io.coco_results import detections_to_coco
from decodet.models.postprocess import postprocess
from decodet.registry import data_recipe
from decodet.runtime.options import EVAL_DEFAULTS, RunOptions, renamed
from decodet.utils import distributed as D
from decodet.utils.console import progress

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Dataset | DataLoader,
    gt: Any = None,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 1,
    workers: int = 0,
    amp: str = "none",
    max_det: int = 100,
    category_ids: list[int] | None = None,
    channels_last: bool = False,
    show_progress: bool = True,
    detections_out: str | os.PathLike | None = None,
    plots_out: str | os.PathLike | None = None,
    plot_threshold: float = RunOptions.score_threshold,
    **old: Any,
) -> dict[str, float]:
    """The 12 COCO stats of ``model`` (put in eval mode here) on ``data``, a dataset with eval transforms or a
    loader of :func:`collate` batches; every process evaluates its shard and gets the stats. ``gt``: COCO
    ground truth (default: the dataset's ``ann_file``). ``batch_size``, ``workers``: for the loader built from
    a dataset. ``amp``: ``none`` | ``bf16`` | ``fp16`` autocast. ``max_det``: detections per image
    (``num_top``: deprecated name). ``category_ids``: logit index -> category id (default: the config's;
    ``None`` there: the index is the id). Rank 0 also writes the COCO results JSON to ``detections_out``, and
    the per-class table, PR curves, confusion matrix (at ``plot_threshold``) and worst images into ``plots_out``."""
    old = renamed(old)
    max_det = old.pop("max_det", max_det)
    if old:
        raise TypeError(f"evaluate() got unexpected keyword arguments {', '.join(sorted(old))}")
    inner = D.unwrap(model)
    device = torch.device(device) if device is not None else next(inner.parameters()).device
    loader = data if isinstance(data, DataLoader) else _loader(data, batch_size, workers)
    gt = gt if gt is not None else getattr(loader.dataset, "ann_file", None)
    if gt is None:
        raise ValueError("evaluate: pass gt (COCO ground truth) for a dataset without ann_file")
    if category_ids is None:
        category_ids = getattr(getattr(inner, "config", None), "category_ids", None)

    was_training = inner.training
    inner.eval()  # the bare module: a DDP forward would sync buffers across uneven shards
    evaluator = CocoEvaluator(max_dets=max_det)
    kept: dict[int, dict[str, Tensor]] = {}
    for images, targets in progress(loader, desc="eval", disable=None if show_progress else True, log_every=0):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            outputs = inner(images)
        canvas = [tuple(images.shape[-2:])] * images.shape[0]
        dets = [_to_original(d, t) for d, t in zip(postprocess(outputs, canvas, max_det, category_ids), targets)]
        ids = [int(t["image_id"]) for t in targets]
        evaluator.update(ids, dets)
        if detections_out is not None:
            kept.update(zip(ids, dets))
    inner.train(was_training)
    return _summarize(evaluator, gt, loader, kept, detections_out, plots_out, plot_threshold)


def _loader(data: Dataset, batch_size: int, workers: int) -> DataLoader:
    """This process's shard of ``data`` in :func:`collate` batches."""
    sampler = D.ShardSampler(len(data), D.get_rank(), D.get_world_size())
    return DataLoader(
        data,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),  # leaves the global RNG alone
    )


def _summarize(
    evaluator: CocoEvaluator, gt: Any, loader: DataLoader, kept: dict, detections_out: Any, plots_out: Any,
    plot_threshold: float,
) -> dict[str, float]:  # fmt: skip
    """Gather every shard's detections; stats (and plots) on rank 0, detections JSON; the stats everywhere."""
    evaluator.gather()
    stats = None
    if D.is_main():
        stats = evaluator.summarize(gt)
        if plots_out is not None:
            from decodet.evaluation.analysis import write_analysis

            dataset = loader.dataset
            dataset = getattr(dataset, "dataset", dataset)  # a Subset's dataset
            write_analysis(plots_out, evaluator.coco_eval, getattr(dataset, "images_dir", None), plot_threshold)
    if detections_out is not None:
        merged = merge_detections(D.all_gather_object(kept))
        if D.is_main():
            atomic_write_text(detections_out, json.dumps(detections_to_coco(merged, max_dets=None)))
    return D.broadcast_object(stats)


def evaluate_checkpoint(
    weights: str | os.PathLike,
    data: str | os.PathLike,
    split: str = "val",
    options: RunOptions | None = None,
    out: str | os.PathLike | None = None,
    workers: int = 0,
    plots: bool = False,
    plot_threshold: float = RunOptions.score_threshold,
    **kwargs: Any,
) -> dict[str, float]:
    """COCO stats of a checkpoint (ours or the authors') on a dataset split. ``options`` (default:
    :data:`~decodet.runtime.options.EVAL_DEFAULTS`), with ``kwargs``
    (:class:`~decodet.runtime.options.RunOptions` fields) replacing fields: the eval transform and size follow
    the model's training recipe (:func:`~decodet.registry.data_recipe`) unless ``imgsz`` is given; the
    keep-aspect ``detr`` resize evaluates one image per batch whatever ``batch_size`` says. With ``out``,
    writes ``detections.json`` and ``stats.json`` into that folder (rank 0), and with ``plots`` the per-class
    table, curves, confusion matrix and worst images too. Under ``torchrun`` every process scores its shard of
    the images; all return the stats.
    ``backend``, ``precision`` or ``compile``, or an ``.onnx`` / ``.xml`` file, evaluate the deployed model
    instead: a ``Detector`` at its fixed size, one process (:func:`decodet.evaluation.deployed.evaluate_deployed`)."""
    o = RunOptions.build(options or RunOptions(**EVAL_DEFAULTS), **kwargs)
    exported = str(weights).lower().endswith((".onnx", ".xml"))
    if o.backend is not None or o.precision is not None or o.compile or exported:
        from decodet.evaluation.deployed import evaluate_deployed

        if plots:
            log.warning("--plots applies to the default evaluation only; not written for a deployed model")
        return evaluate_deployed(weights, data, split, o, out)
    created_group = not D.is_dist()
    try:
        # under torchrun every process scores its shard of the images (joins the group here)
        dev = D.init_distributed(o.device).device
        return _evaluate_checkpoint(weights, data, split, o, dev, out, workers, plots, plot_threshold)
    finally:
        if created_group:
            D.cleanup()


def _evaluate_checkpoint(
    weights: Any, data: Any, split: str, o: RunOptions, dev: torch.device, out: Any, workers: int, plots: bool,
    plot_threshold: float,
) -> dict[str, float]:  # fmt: skip
    from decodet.io.checkpoint import load_model

    model = load_model(weights, map_location=dev)
    mcfg = model.config
    split_spec = resolve_data(data).split(split)
    recipe = data_recipe(mcfg)
    tf = build_transforms(
        recipe["transforms"], train=False, imgsz=o.imgsz or recipe["imgsz"], normalize=input_normalized(mcfg)
    )
    dataset = CocoDetection(split_spec.images_dir, split_spec.ann_file, transforms=tf)
    check_labels_fit(mcfg, dataset)
    out_dir = Path(out) if out is not None else None
    stats = evaluate(
        model,
        dataset,
        device=dev,
        batch_size=eval_batch_size(recipe["transforms"], o.batch_size),
        workers=workers,
        detections_out=out_dir / "detections.json" if out_dir else None,
        plots_out=out_dir if out_dir is not None and plots else None,
        plot_threshold=plot_threshold,
    )
    if out_dir is not None and D.is_main():
        atomic_write_text(out_dir / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``amp`` (``none`` | ``bf16`` | ``fp16``) on ``device``'s type."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def eval_batch_size(recipe: str, batch_size: int) -> int:
    """1 for the keep-aspect ``detr`` eval resize: DECO has no padding mask, so padding a batch to a common
    size would change its detections (the authors evaluate one image at a time)."""
    if recipe == "detr" and batch_size > 1:
        log.info("evaluating one image per batch: padded batches would change DECO's outputs")
        return 1
    return batch_size


def _to_original(det: dict[str, Tensor], target: dict[str, Any]) -> dict[str, Tensor]:
    """Boxes in canvas pixels -> the original image's pixels (``orig_size / size`` per axis), clamped."""
    oh, ow = (float(v) for v in target["orig_size"])
    h, w = (float(v) for v in target["size"])
    boxes = det["boxes"].float().clone()
    boxes[:, 0::2] = (boxes[:, 0::2] * (ow / w)).clamp(0, ow)
    boxes[:, 1::2] = (boxes[:, 1::2] * (oh / h)).clamp(0, oh)
    return {"boxes": boxes.cpu(), "scores": det["scores"].float().cpu(), "labels": det["labels"].cpu()}


def check_labels_fit(mcfg: ModelConfig, dataset: CocoDetection) -> None:
    """:class:`DecodetError` when the dataset has more categories than the model has class logits."""
    if mcfg.num_classes < dataset.num_classes:
        raise DecodetError(
            f"the dataset has {dataset.num_classes} categories but the model {mcfg.name} has "
            f"{mcfg.num_classes} class logits",
            dataset.ann_file,
        )
