"""Typed model configurations, serialised into every checkpoint.

A config fully describes how to build a model, so ``load_model(path)`` needs no preset
name.  ``DecoConfig`` describes the single-scale DECO family, ``DecoPlusConfig`` the
multi-scale DECO+ (RT-DETR frame) family.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from decodet.errors import DecodetError, reject_unknown

# ImageNet's per-channel mean and std of RGB pixels in [0, 1]: DETR's and DECO's input convention.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DecoConfig:
    """Single-scale DECO: backbone C5 -> ConvNeXt encoder -> SIM/CIM decoder."""

    arch: str = "deco"
    name: str = "deco_r50"
    num_classes: int = 91
    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101 | convnext_tiny
    pretrained_backbone: bool = False
    freeze_backbone_bn: bool = True  # torchvision FrozenBatchNorm2d (the authors' setting)
    freeze_stem_layer1: bool = True  # stem and layer1 get no gradient (ResNet only)
    d_model: int = 480
    encoder_dims: tuple[int, ...] = (120, 240, 480)
    encoder_depths: tuple[int, ...] = (2, 6, 2)
    encoder_kernel: int = 7
    num_decoder_layers: int = 6
    decoder_kernel: int = 9
    query_grid: tuple[int, int] = (10, 10)  # qH, qW: num_queries = qH * qW
    drop_path: float = 0.0
    # Input convention: ImageNet mean/std normalisation (DETR, DECO) or plain [0, 1] pixels
    # (RT-DETR, and so the authors' DECO+ checkpoints).
    normalize: bool = True
    # Output labelling: contiguous logit index -> dataset category id and name.
    # ``None`` means the logit index *is* the category id (the authors' COCO layout).
    category_ids: list[int] | None = None
    class_names: list[str] | None = None

    @property
    def num_queries(self) -> int:
        return self.query_grid[0] * self.query_grid[1]


@dataclass
class DecoPlusConfig:
    """Multi-scale DECO+: ResNet-D -> conv hybrid encoder (CCFM) -> query selection ->
    conv decoder with iterative box refinement."""

    arch: str = "decoplus"
    name: str = "decoplus_r18"
    num_classes: int = 80
    backbone: str = "presnet18"  # presnet18 | presnet34 | presnet50 | presnet101
    pretrained_backbone: bool = False
    freeze_backbone_bn: bool = False
    freeze_at: int = -1  # -1: nothing frozen; 0: stem frozen
    backbone_width: int = 64  # base width of the ResNet-D (64 = published); smaller for CPU models
    hidden_dim: int = 256
    encoder_blocks: int = 4  # ConvNeXt blocks on the stride-32 level (AIFI replacement)
    expansion: float = 0.5  # CSP expansion (0.5 for R18, 1.0 for R50)
    csp_blocks: int = 3
    num_decoder_layers: int = 3
    query_grid: tuple[int, int] = (15, 20)
    num_top_queries: int = 300  # detections kept by post-processing
    eval_size: tuple[int, int] = (640, 640)
    drop_path: float = 0.0
    normalize: bool = False  # RT-DETR's convention: [0, 1] pixels, no mean/std
    # Hybrid matching (H-DETR), training only: an extra group of Q queries (the next-best
    # encoder positions) matched one-to-many to the targets repeated this many times.
    # 0 = off (the published presets).  Inference is unchanged: one-to-one, no NMS.
    one_to_many: int = 0
    # Denoising queries (DN-DETR / DINO), training only: this many extra query grids per image of
    # noised ground-truth boxes, each to be reconstructed (positives) or rejected (negatives);
    # decodet.models.denoising.  0 = off (the published presets).  Inference is unchanged.
    denoising: int = 0
    # An auxiliary dense head (Co-DETR's idea, TOOD's assignment), training only: a separate head scores
    # every encoder position and each target is assigned to up to this many of them (decodet.losses.dense).
    # 0 = off (the published presets).  Inference never runs it; predictions are unchanged.
    dense_aux: int = 0
    # Where the selected queries sit on the decoder's grid: "score" (the release: row-major
    # in top-k order) or "spatial" (rows by reference-box centre y, each row by x, so a
    # query's grid cell follows its box, as DECO's fixed query grid does).
    query_layout: str = "score"
    category_ids: list[int] | None = None
    class_names: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_queries(self) -> int:
        return self.query_grid[0] * self.query_grid[1]


ModelConfig = DecoConfig | DecoPlusConfig
_ARCHS: dict[str, type] = {"deco": DecoConfig, "decoplus": DecoPlusConfig}


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """Plain-JSON form of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Inverse of :func:`config_to_dict`; unknown keys are an error, missing ones default."""
    arch = data.get("arch")
    if arch not in _ARCHS:
        raise DecodetError(f"unknown model architecture {arch!r} in config (expected one of {sorted(_ARCHS)})")
    cls = _ARCHS[arch]
    known = {f.name: f for f in dataclasses.fields(cls)}
    reject_unknown(data, known, f"config key(s) for {arch}")
    kwargs = {}
    for key, value in data.items():
        if isinstance(value, list) and str(known[key].type).startswith("tuple"):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[key] = value
    return cls(**kwargs)


def replace(cfg: ModelConfig, **overrides: Any) -> ModelConfig:
    """A copy of ``cfg`` with ``overrides``; unknown names are a :class:`DecodetError`."""
    reject_unknown(overrides, (f.name for f in dataclasses.fields(cfg)), f"option(s) for {cfg.name}")
    return dataclasses.replace(cfg, **overrides)


def input_normalized(cfg: ModelConfig) -> bool:
    """Whether the model takes ImageNet-normalised input: yes unless its config turns
    ``normalize`` off (a field, or in ``extra``): RT-DETR's plain [0, 1] convention.
    Training, evaluation, export and inference all ask this one rule."""
    flag = getattr(cfg, "normalize", None)
    if flag is None:
        flag = (getattr(cfg, "extra", None) or {}).get("normalize", True)
    return bool(flag)


def normalization(cfg: ModelConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input ``(mean, std)`` the model expects: ImageNet's, or ``(0, 0, 0), (1, 1, 1)`` when
    :func:`input_normalized` says no."""
    return (IMAGENET_MEAN, IMAGENET_STD) if input_normalized(cfg) else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
