"""Model presets by name (timm-like): ``list_models()``, ``build_model(name, ...)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from decodet.config import DecoConfig, DecoPlusConfig, ModelConfig, replace
from decodet.errors import DecodetError

_PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def register_preset(name: str) -> Callable[[Callable[[], ModelConfig]], Callable[[], ModelConfig]]:
    def wrap(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
        _PRESETS[name] = fn
        return fn

    return wrap


@register_preset("deco_r18")
def _deco_r18() -> ModelConfig:
    return DecoConfig(name="deco_r18", backbone="resnet18")


@register_preset("deco_r50")
def _deco_r50() -> ModelConfig:
    return DecoConfig(name="deco_r50", backbone="resnet50")


@register_preset("deco_convnext_tiny")
def _deco_convnext_tiny() -> ModelConfig:
    return DecoConfig(name="deco_convnext_tiny", backbone="convnext_tiny")


@register_preset("decoplus_r18")
def _decoplus_r18() -> ModelConfig:
    return DecoPlusConfig(name="decoplus_r18", backbone="presnet18", expansion=0.5, num_decoder_layers=3)


@register_preset("decoplus_r50")
def _decoplus_r50() -> ModelConfig:
    return DecoPlusConfig(
        name="decoplus_r50",
        backbone="presnet50",
        expansion=1.0,
        num_decoder_layers=6,
        freeze_backbone_bn=True,  # the authors' R50 setting: frozen batch norm, frozen stem
        freeze_at=0,
    )


@register_preset("deco_tiny")
def _deco_tiny() -> ModelConfig:
    # Our CPU-sized member of the family, on the DECO+ frame: query selection from dense
    # encoder predictions converges far faster from random weights than DECO's learned
    # queries (see README, "deco_tiny").  Everything trains, batch norm included.
    return DecoPlusConfig(
        name="deco_tiny",
        num_classes=80,
        backbone="presnet18",
        backbone_width=32,
        hidden_dim=128,
        encoder_blocks=1,
        expansion=0.5,
        csp_blocks=1,
        num_decoder_layers=3,
        query_grid=(10, 10),
        num_top_queries=100,
        eval_size=(320, 320),
        # Queries placed on the grid by box centre: on the bundled data, AP 0.384 vs 0.359
        # in score order (the demo recipe with zoom 0.4, 1,500 steps).
        query_layout="spatial",
    )


def list_models() -> list[str]:
    """Names of the model presets, sorted."""
    return sorted(_PRESETS)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The preset's config with ``overrides`` applied."""
    if name not in _PRESETS:
        raise DecodetError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return replace(_PRESETS[name](), **overrides)


def build_from_config(cfg: ModelConfig) -> torch.nn.Module:
    """Instantiate the model a config describes (random weights unless pretrained_backbone)."""
    if cfg.arch == "deco":
        from decodet.models.deco import DECO

        return DECO(cfg)
    if cfg.arch == "decoplus":
        from decodet.models.decoplus import DECOPlus

        return DECOPlus(cfg)
    raise DecodetError(f"unknown architecture {cfg.arch!r}")


def build_model(name: str, num_classes: int = 80, **overrides: Any) -> torch.nn.Module:
    """Build preset ``name`` with ``num_classes`` logits and config ``overrides``.

    >>> model = build_model("deco_tiny", num_classes=6)
    """
    return build_from_config(get_config(name, num_classes=num_classes, **overrides))
