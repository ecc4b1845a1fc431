"""Model presets by name (timm-like): ``list_models()``, ``build_model(name, ...)``.

A preset is one :class:`Preset` record that keeps together everything chosen per model:

- how to build its model config;
- its **data recipe** (:class:`DataRecipe`: augmentation, image size, multi-scale), for training and evaluation;
- its **training recipes** (:class:`TrainRecipe`) from a pretrained backbone (or ``--weights``) and from
  scratch: the defaults of ``TrainConfig``'s ``None`` fields and what is frozen;
- its **deploy defaults**: the inference size and the detections kept per image.

Training (``decodet.engine.train_config.resolve``), evaluation, ``Detector`` and export read them from here, so
adding a preset is one ``register(Preset(...))`` in this file."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from decodet.config import DecoConfig, DecoPlusConfig, ModelConfig, replace
from decodet.errors import DecodetError


@dataclass(frozen=True)
class DataRecipe:
    """Augmentation of :mod:`decodet.data.transforms` and its size (training and evaluation)."""

    transforms: str  # detr | light | rtdetr
    imgsz: int | None = None  # detr: short side; light / rtdetr: square side; None: the config's eval_size
    multiscale: bool = False  # RT-DETR's per-batch random square size around imgsz


@dataclass(frozen=True)
class TrainRecipe:
    """Defaults of ``TrainConfig``'s recipe fields; ``freeze``: model config overrides (what is frozen)."""

    lr: float
    lr_backbone: float
    lr_encoder: float | None  # DECO's encoder group; None: same as lr
    weight_decay: float
    norm_bias_decay: bool  # weight decay on norm weights and biases too
    schedule: str  # step | cosine | constant
    warmup_steps: int
    ema: bool
    freeze: Mapping[str, Any]
    clip_grad: float = 0.1  # max gradient norm (DETR's and the authors' 0.1)
    batch_size: int = 4  # per process
    loss: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # build_criterion options

    def fields(self) -> dict[str, Any]:
        """``TrainConfig`` field values; the freezing settings under ``model_overrides``, the loss options
        under ``loss_overrides``."""
        skip = ("freeze", "loss")
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        return {**values, "model_overrides": dict(self.freeze), "loss_overrides": dict(self.loss)}


@dataclass(frozen=True)
class Preset:
    """A named model with its recipes (module docstring)."""

    name: str
    config: Callable[[], ModelConfig]
    data: DataRecipe
    pretrained: TrainRecipe  # a pretrained backbone, or --weights
    scratch: TrainRecipe  # random weights
    # Deploy defaults.  None: the config carries them (DECO+'s ``eval_size``, set by training; ``num_top_queries``).
    imgsz: tuple[int, int] | None = None
    num_top: int | None = None


_PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    """Add ``preset`` to :func:`list_models`."""
    _PRESETS[preset.name] = preset
    return preset


# ----------------------------------------------------------------------------- recipes

# DECO, the authors' recipe (step schedule: lr / 10 at 2/3 of the epochs, 100 of 150).
DECO_PRETRAINED = TrainRecipe(
    lr=1e-4, lr_backbone=1e-5, lr_encoder=1e-5, weight_decay=1e-4, norm_bias_decay=True, schedule="step",
    warmup_steps=0, ema=False, freeze={"freeze_backbone_bn": True, "freeze_stem_layer1": True},
)  # fmt: skip


def rtdetr_pretrained(freeze_stem_and_bn: bool) -> TrainRecipe:
    """DECO+ on RT-DETR's recipe.  ResNet-D-50 and up freeze the stem and batch norm."""
    freeze = {"freeze_backbone_bn": freeze_stem_and_bn, "freeze_at": 0 if freeze_stem_and_bn else -1}
    return TrainRecipe(
        lr=1.5e-4, lr_backbone=1.5e-5, lr_encoder=None, weight_decay=1e-4, norm_bias_decay=False,
        schedule="constant", warmup_steps=0, ema=True, freeze=freeze,
    )  # fmt: skip


def from_scratch(ema: bool, freeze: Mapping[str, Any]) -> TrainRecipe:
    """From random weights: everything (batch norm included) at one, higher rate, warm-up then cosine."""
    return TrainRecipe(
        lr=4e-4, lr_backbone=4e-4, lr_encoder=None, weight_decay=1e-4, norm_bias_decay=False, schedule="cosine",
        warmup_steps=200, ema=ema, freeze=freeze,
    )  # fmt: skip


# deco_tiny from random weights on a CPU: the demo's measured recipe (docs/benchmarks.md, "The demo's
# recipe"): a higher rate with a short warm-up, looser clipping, a heavier class term, batches of 8 (about the
# same images per second as 4 on a 2-core CPU, half the steps; the bundled set in 3 minutes reached AP 0.141
# against 0.089 at 4, docs/convergence.md).  Against the generic one above (lr 4e-4, clip 0.1, class
# weight 1) it is what took the bundled set from AP 0.2 to 0.58 in the same minutes; on a photo set the
# generic one stayed at AP 0.002 (issue 19).
TINY_SCRATCH = TrainRecipe(
    lr=1e-3, lr_backbone=1e-3, lr_encoder=None, weight_decay=1e-4, norm_bias_decay=False, schedule="cosine",
    warmup_steps=100, ema=True, freeze={"freeze_backbone_bn": False, "freeze_at": -1}, clip_grad=1.0,
    batch_size=8, loss={"weight_class": 3.0},
)  # fmt: skip
# deco_tiny from a detector (--weights): DECO+'s fine-tuning recipe at 3.3x its rates.  The fine-tuning proxy
# (the demo's model fine-tuned on two other generated sets, 3 minutes on a 2-core Zen 4, docs/convergence.md)
# reached AP 0.633 and 0.635 at lr 5e-4 against 0.352 and 0.574 at RT-DETR's 1.5e-4; 1e-3 tied (0.630, 0.644);
# 2e-3 and a cosine decay lost on the first set (0.563, 0.534) and tied on the second.  Our own preset: no
# published recipe changes.
TINY_FINETUNE = dataclasses.replace(rtdetr_pretrained(freeze_stem_and_bn=False), lr=5e-4, lr_backbone=5e-5)
DECO_SCRATCH = from_scratch(ema=False, freeze={"freeze_backbone_bn": False, "freeze_stem_layer1": False})
DECOPLUS_SCRATCH = from_scratch(ema=True, freeze={"freeze_backbone_bn": False, "freeze_at": -1})
DETR_DATA = DataRecipe("detr", 800)  # one image per evaluation batch (no padding)
RTDETR_DATA = DataRecipe("rtdetr", multiscale=True)  # at the eval square (640)


# ----------------------------------------------------------------------------- presets


def deco_preset(name: str, backbone: str) -> Preset:
    """A single-scale DECO preset on the authors' recipes.  Deploy: 640x640 (the authors evaluate at short side
    800 keeping aspect; inference and export take one fixed size, and DECO's config has none), 100 detections."""
    return Preset(
        name,
        lambda: DecoConfig(name=name, backbone=backbone),
        DETR_DATA,
        DECO_PRETRAINED,
        DECO_SCRATCH,
        imgsz=(640, 640),
        num_top=100,
    )


register(deco_preset("deco_r18", "resnet18"))
register(deco_preset("deco_r50", "resnet50"))
register(deco_preset("deco_convnext_tiny", "convnext_tiny"))

register(
    Preset(
        "decoplus_r18",
        lambda: DecoPlusConfig(name="decoplus_r18", backbone="presnet18", expansion=0.5, num_decoder_layers=3),
        RTDETR_DATA,
        rtdetr_pretrained(freeze_stem_and_bn=False),
        DECOPLUS_SCRATCH,
    )
)

register(
    Preset(
        "decoplus_r50",
        lambda: DecoPlusConfig(
            name="decoplus_r50",
            backbone="presnet50",
            expansion=1.0,
            num_decoder_layers=6,
            freeze_backbone_bn=True,  # the authors' R50 setting: frozen batch norm, frozen stem
            freeze_at=0,
        ),
        RTDETR_DATA,
        rtdetr_pretrained(freeze_stem_and_bn=True),
        DECOPLUS_SCRATCH,
    )
)

# Our CPU-sized member, on the DECO+ frame: query selection from dense encoder predictions converges far
# faster from random weights than DECO's learned queries (README, "deco_tiny").
register(
    Preset(
        "deco_tiny",
        lambda: DecoPlusConfig(
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
            # On the bundled data, AP 0.384 vs 0.359 in score order (demo recipe, zoom 0.4, 1,500 steps).
            query_layout="spatial",
        ),
        DataRecipe("light"),
        TINY_FINETUNE,
        TINY_SCRATCH,
    )
)


# ----------------------------------------------------------------------------- lookups


def list_models() -> list[str]:
    """Names of the model presets, sorted."""
    return sorted(_PRESETS)


def get_preset(name: str) -> Preset:
    """The :class:`Preset` called ``name``; :class:`DecodetError` if there is none."""
    if name not in _PRESETS:
        raise DecodetError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _PRESETS[name]


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The preset's config with ``overrides`` applied."""
    return replace(get_preset(name).config(), **overrides)


def data_recipe(cfg: ModelConfig) -> dict[str, Any]:
    """``transforms``, ``imgsz``, ``multiscale`` of a config's preset (a sizeless recipe takes ``eval_size``)."""
    recipe = get_preset(cfg.name).data
    imgsz = recipe.imgsz if recipe.imgsz is not None else int(cfg.eval_size[0])
    return {"transforms": recipe.transforms, "imgsz": imgsz, "multiscale": recipe.multiscale}


def train_recipe(name: str, pretrained: bool) -> dict[str, Any]:
    """Default ``TrainConfig`` field values (data recipe included) of preset ``name``, by whether its backbone
    starts pretrained; ``model_overrides`` holds the freezing settings."""
    preset = get_preset(name)
    recipe = preset.pretrained if pretrained else preset.scratch
    return {**data_recipe(preset.config()), **recipe.fields()}


def trained_size_fields(name: str, transforms: str, imgsz: int) -> dict[str, Any]:
    """Config fields recording the training size: a preset whose config carries ``eval_size`` gets the training
    square when the augmentation resizes to one, so evaluation, ``Detector`` and export run at that size."""
    if get_preset(name).imgsz is None and transforms in ("light", "rtdetr"):
        return {"eval_size": (imgsz, imgsz)}
    return {}


def deploy_imgsz(cfg: ModelConfig) -> tuple[int, int]:
    """The fixed inference ``(height, width)`` of a model: its preset's, else its config's ``eval_size``."""
    size = get_preset(cfg.name).imgsz or cfg.eval_size
    return int(size[0]), int(size[1])


def deploy_num_top(cfg: ModelConfig) -> int:
    """Detections kept per image: its preset's, else its config's ``num_top_queries``."""
    num_top = get_preset(cfg.name).num_top
    return int(num_top if num_top is not None else cfg.num_top_queries)


# ----------------------------------------------------------------------------- building


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
    """Build preset ``name`` with ``num_classes`` logits and config ``overrides``: ``build_model("deco_tiny")``."""
    return build_from_config(get_config(name, num_classes=num_classes, **overrides))
