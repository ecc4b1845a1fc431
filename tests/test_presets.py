"""Every preset of ``decodet.list_models()``: build, forward contract, loss, checkpoint round
trip, and the recipes and deploy defaults the registry keeps with it.

Parametrised over the registry itself, so a new preset is tested without touching this file.
Each preset keeps its real architecture (only ``num_classes`` is small); images are 160x160,
the smallest square giving DECO+'s 300 queries enough encoder positions (20^2 + 10^2 + 5^2).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import decodet
from decodet.config import config_from_dict, config_to_dict
from decodet.data.transforms import RECIPES
from decodet.engine.train_config import _RECIPE_FIELDS, TrainConfig, resolve
from decodet.errors import DecodetError
from decodet.inference.graph import as_size
from decodet.io.checkpoint import load_model, save_model
from decodet.models.layers import FrozenBatchNorm2d
from decodet.registry import (
    data_recipe,
    deploy_imgsz,
    deploy_num_top,
    get_config,
    train_recipe,
    trained_size_fields,
)

PRESETS = decodet.list_models()
NUM_CLASSES = 3
SIZE = 160


def _targets(batch: int) -> list[dict[str, torch.Tensor]]:
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]])  # normalised cxcywh
    return [{"labels": torch.tensor([0, 2]), "boxes": boxes} for _ in range(batch)]


def test_the_registry_has_the_documented_presets() -> None:
    # the README's model table; a preset added to the registry is tested below without edits here
    assert {"deco_r18", "deco_r50", "deco_convnext_tiny", "decoplus_r18", "decoplus_r50", "deco_tiny"} <= set(PRESETS)


@pytest.mark.slow  # the full-size presets (up to 60M parameters) from random weights: 4-12 s each
@pytest.mark.parametrize("name", PRESETS)
def test_build_forward_loss_and_checkpoint_round_trip(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = decodet.build_model(name, num_classes=NUM_CLASSES)
    cfg = model.config
    assert (cfg.name, cfg.num_classes) == (name, NUM_CLASSES)
    assert config_from_dict(config_to_dict(cfg)) == cfg

    # one forward contract: a float [B, 3, H, W] tensor, anything else a one-line DecodetError
    for bad in (torch.rand(3, SIZE, SIZE), torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8)):
        with pytest.raises(DecodetError, match="model input must"):
            model.eval()(bad)

    images = torch.rand(2, 3, SIZE, SIZE)
    model.eval()
    with torch.no_grad():
        out = model(images)
    q = cfg.num_queries
    assert set(out) == {"pred_logits", "pred_boxes"}
    assert out["pred_logits"].shape == (2, q, NUM_CLASSES) and out["pred_boxes"].shape == (2, q, 4)
    assert torch.isfinite(out["pred_logits"]).all()
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()

    # training: the preset's criterion gives a finite loss whose gradient reaches the class heads
    model.train()
    criterion = decodet.build_criterion(cfg)
    losses = criterion(model(images), _targets(2))
    assert math.isfinite(losses["loss"].item()) and losses["loss"].item() > 0
    losses["loss"].backward()
    heads = [p for n, p in model.named_parameters() if "class_heads" in n or "score_head" in n]
    assert heads and all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)

    # checkpoint round trip: same config, same tensors, same detections (after the training
    # step moved any batch-norm statistics)
    model.eval()
    with torch.no_grad():
        out = model(images)
    loaded = load_model(save_model(model, tmp_path / f"{name}.safetensors"))
    assert loaded.config == cfg
    own, back = model.state_dict(), loaded.state_dict()
    assert own.keys() == back.keys() and all(torch.equal(own[k], back[k]) for k in own)
    with torch.no_grad():
        again = loaded(images)
    assert torch.equal(again["pred_logits"], out["pred_logits"])
    assert torch.equal(again["pred_boxes"], out["pred_boxes"])


@pytest.mark.parametrize("name", PRESETS)
def test_recipes_follow_the_documented_rules(name: str) -> None:
    cfg = get_config(name)
    pretrained, scratch = train_recipe(name, pretrained=True), train_recipe(name, pretrained=False)
    for recipe in (pretrained, scratch):
        # every recipe fills exactly the TrainConfig fields it documents, with a known augmentation
        assert set(recipe) - {"model_overrides", "loss_overrides"} == _RECIPE_FIELDS
        assert recipe["transforms"] in RECIPES and recipe["imgsz"] >= 32

    # pretrained: the published recipe of the architecture (README, train_config docstring) and
    # the preset's own published freezing (its config's defaults)
    if cfg.arch == "deco":
        published = {"lr": 1e-4, "lr_backbone": 1e-5, "lr_encoder": 1e-5, "schedule": "step", "ema": False}
        published |= {"weight_decay": 1e-4, "norm_bias_decay": True}
    else:
        published = {"lr": 1.5e-4, "lr_backbone": 1.5e-5, "lr_encoder": None, "schedule": "constant", "ema": True}
        if name == "deco_tiny":  # our own preset: RT-DETR's recipe at the rates measured for it (TINY_FINETUNE)
            published |= {"lr": 5e-4, "lr_backbone": 5e-5}
        published |= {"weight_decay": 1e-4, "norm_bias_decay": False}
    assert {k: pretrained[k] for k in published} == published
    assert pretrained["warmup_steps"] == 0
    assert all(getattr(cfg, k) == v for k, v in pretrained["model_overrides"].items())

    # from scratch: everything trains (batch norm included) at one, higher learning rate,
    # with a warm-up and a cosine decay
    assert scratch["lr_backbone"] == scratch["lr"] > pretrained["lr"]
    assert scratch["schedule"] == "cosine" and scratch["warmup_steps"] > 0
    assert scratch["model_overrides"]["freeze_backbone_bn"] is False
    assert set(scratch["model_overrides"]) == set(pretrained["model_overrides"])
    with torch.device("meta"):
        fresh = decodet.build_model(name, num_classes=NUM_CLASSES, **scratch["model_overrides"])
    assert all(p.requires_grad for p in fresh.parameters())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fresh.modules())

    # resolve() fills exactly the recipe into a TrainConfig left at its defaults
    for flag, recipe in ((True, pretrained), (False, scratch)):
        resolved = resolve(TrainConfig(model=name, pretrained_backbone=flag))
        assert {k: getattr(resolved, k) for k in recipe if k != "model_overrides"} == {
            k: v for k, v in recipe.items() if k != "model_overrides"
        }
        assert resolved.model_overrides == recipe["model_overrides"]


@pytest.mark.parametrize("name", PRESETS)
def test_data_recipe_and_deploy_defaults(name: str) -> None:
    cfg = get_config(name)
    data = data_recipe(cfg)
    assert train_recipe(name, pretrained=True)["transforms"] == data["transforms"]
    assert data["multiscale"] is (data["transforms"] == "rtdetr")  # only RT-DETR's recipe is multi-scale
    if cfg.arch == "deco":  # DETR's augmentation at short side 800 (the authors'); 640x640, 100 boxes deployed
        assert (data["transforms"], data["imgsz"]) == ("detr", 800)
        assert deploy_imgsz(cfg) == (640, 640) and deploy_num_top(cfg) == 100
    else:  # a fixed square: trained, evaluated and deployed at the config's eval_size
        assert data["imgsz"] == cfg.eval_size[0] and deploy_imgsz(cfg) == tuple(cfg.eval_size)
        assert deploy_num_top(cfg) == cfg.num_top_queries
    assert as_size(None, cfg) == deploy_imgsz(cfg)

    # a model trained at another square records it, so evaluation and deploy follow
    recorded = trained_size_fields(name, data["transforms"], 256)
    trained = get_config(name, **recorded)
    if data["transforms"] == "detr":
        assert recorded == {} and deploy_imgsz(trained) == deploy_imgsz(cfg)
    else:
        assert deploy_imgsz(trained) == (256, 256) and data_recipe(trained)["imgsz"] == 256


def test_unknown_preset_has_no_recipe() -> None:
    with pytest.raises(DecodetError, match="unknown model 'nope'"):
        train_recipe("nope", pretrained=True)
