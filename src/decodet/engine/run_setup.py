"""What a run is built from: its datasets and their transforms (unreadable images skipped with a
warning), the model config, the training loader, the memory layout; under DDP, which parameters get no gradient."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from decodet.config import config_from_dict, replace
from decodet.data.coco import CocoDetection
from decodet.data.mosaic import Mosaic
from decodet.data.spec import DataSpec, resolve_data
from decodet.data.transforms import MultiScaleCollate, build_transforms, collate, multiscale_sizes
from decodet.engine.train_config import TrainConfig
from decodet.errors import DecodetError
from decodet.evaluation.evaluate import autocast
from decodet.registry import get_config, trained_size_fields
from decodet.utils import distributed as D

log = logging.getLogger(__name__)


def open_train_set(cfg: TrainConfig) -> tuple[DataSpec, CocoDetection]:
    """The dataset spec of ``cfg.data`` and its training split, without transforms yet (they
    depend on the model config, which reads the classes from the split)."""
    spec = resolve_data(cfg.data) if cfg.data else None
    if spec is None:
        raise DecodetError("no dataset given: pass --data (a dataset folder or data.yaml)")
    split = spec.split(cfg.train_split)
    train_set = CocoDetection(split.images_dir, split.ann_file, skip_bad_images=True)
    if len(train_set) == 0:
        raise DecodetError("the training split has no images", split.ann_file)
    return spec, train_set


def add_transforms(cfg: TrainConfig, spec: DataSpec, train_set: CocoDetection, normalize: bool) -> CocoDetection | None:
    """Give the training set its augmentation; returns the validation set (``None`` when the
    dataset has no validation split, with a warning naming the missing file)."""
    augment = dict(zoom=cfg.zoom, shift=cfg.shift, jitter=cfg.jitter)
    train_set.transforms = build_transforms(cfg.transforms, train=True, imgsz=cfg.imgsz, normalize=normalize, **augment)
    if not spec.has_split(cfg.val_split):
        log.warning("%s", spec.no_val_warning(cfg.val_split))  # names the missing file (decodet data check too)
        return None
    split = spec.split(cfg.val_split)
    tf = build_transforms(cfg.transforms, train=False, imgsz=cfg.imgsz, normalize=normalize)
    return CocoDetection(split.images_dir, split.ann_file, transforms=tf, skip_bad_images=True)


def build_train_loader(
    cfg: TrainConfig, train_set: CocoDetection, info: D.DistInfo
) -> tuple[D.EpochSampler, torch.Generator, DataLoader, int]:
    """The training loader over this rank's shard: ``(sampler, generator, loader, batches per
    epoch)``; the sampler and generator are re-seeded at every epoch start for a reproducible order."""
    sampler = D.EpochSampler(train_set, seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    generator = torch.Generator()
    loader = DataLoader(
        Mosaic(train_set, cfg.mosaic) if cfg.mosaic else train_set,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        collate_fn=MultiScaleCollate(multiscale_sizes(cfg.imgsz)) if cfg.multiscale else collate,
        pin_memory=info.device.type == "cuda",
        generator=generator,
        drop_last=False,
    )
    return sampler, generator, loader, math.ceil(len(sampler) / cfg.batch_size)


def run_model_config(cfg: TrainConfig, state: dict[str, Any] | None, train_set: CocoDetection) -> Any:
    """The resumed run's model config, or the preset's with the dataset's classes, the training
    size (where the config carries its inference size, DECO+'s ``eval_size``) and the overrides."""
    if state is not None:
        return replace(config_from_dict(state["model_config"]), pretrained_backbone=False)  # the state has all weights
    dataset_fields = {
        "num_classes": train_set.num_classes,
        "category_ids": list(train_set.category_ids),
        "class_names": list(train_set.class_names),
        "pretrained_backbone": cfg.pretrained_backbone,
        **trained_size_fields(cfg.model, cfg.transforms, cfg.imgsz),
    }
    return get_config(cfg.model, **{**dataset_fields, **cfg.model_overrides})


def probe_unused(model: nn.Module, criterion: nn.Module, dataset: Dataset, device: torch.device, amp: str) -> list[str]:
    """Names of trainable parameters that get no gradient (DDP then needs find_unused_parameters).

    Runs one forward/backward on the first training image; buffers (BN statistics) are restored.
    """
    saved = {k: v.clone() for k, v in model.state_dict().items() if k in dict(model.named_buffers())}
    images, targets = collate([dataset[0]])
    with autocast(device, amp):
        outputs = model(images.to(device))
    targets = [{"labels": t["labels"].to(device), "boxes": t["boxes"].to(device)} for t in targets]
    criterion(outputs, targets)["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    model.load_state_dict(saved, strict=False)
    if unused:
        log.debug("parameters without gradient (DDP find_unused_parameters on): %s", unused[:5])
    return unused


def channels_last_for(device: torch.device) -> bool:
    """Whether a run on ``device`` trains in channels-last layout when its config leaves it unset: on a CPU,
    where oneDNN's convolutions then skip their layout reorders (``deco_tiny``, batch 8, 2-core Zen 4,
    ``benchmarks/bench_train.py --layout-ab``: fp32 steps 1.09x faster at 160 px, 1.12x at 256; bf16 1.05x and
    1.03x; docs/benchmarks.md); not on CUDA, where it is not measured."""
    return device.type == "cpu"
