"""Progressive resizing (TrainConfig.start_imgsz, decodet.engine.progressive): the early batches are smaller,
the model ends at imgsz, and bad settings are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from decodet.engine.progressive import ProgressiveSize, resize_batch
from decodet.engine.train_config import TrainConfig
from decodet.engine.trainer import Trainer
from decodet.errors import DecodetError
from test_trainer import make_tiny_coco, tiny_config


def test_the_start_side_holds_for_its_share_of_the_budget_or_the_steps_then_never_again() -> None:
    timed = ProgressiveSize(96, 0.4, 160, announce=False)
    assert timed.side(trained_s=10, budget_s=100, step=900, total_steps=1000) == 96  # time decides, not steps
    assert timed.side(trained_s=39.9, budget_s=100, step=1, total_steps=1000) == 96
    assert timed.side(trained_s=40, budget_s=100, step=2, total_steps=1000) is None
    assert timed.side(trained_s=1, budget_s=100, step=3, total_steps=1000) is None  # latched: no way back
    stepped = ProgressiveSize(96, 0.5, 160, announce=False)
    assert stepped.side(trained_s=1e6, budget_s=None, step=49, total_steps=100) == 96
    assert stepped.side(trained_s=0, budget_s=None, step=50, total_steps=100) is None
    assert ProgressiveSize(None, 0.5, 160).side(0, None, 0, 100) is None


def test_resize_batch_keeps_the_content_and_passes_its_own_size_through() -> None:
    images = torch.zeros(2, 3, 64, 64)
    images[:, 0, :32] = 1.0  # red top half
    small = resize_batch(images, 32)
    assert small.shape == (2, 3, 32, 32)
    assert small[:, 0, :15].min() > 0.99 and small[:, 0, 17:].max() < 0.01 and small[:, 1:].abs().max() == 0
    assert resize_batch(images, 64) is images


def test_a_run_trains_small_first_then_at_imgsz_and_saves_an_imgsz_model(tmp_path: Path) -> None:
    data = make_tiny_coco(tmp_path / "data", n_train=4, sizes=((96, 96),))
    cfg = tiny_config(tmp_path, data, imgsz=96, start_imgsz=64, start_fraction=0.5, max_steps=6, epochs=3, eval_every=1)
    trainer = Trainer(cfg)
    seen: list[int] = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        if module.training:
            seen.append(int(args[0].shape[-1]))

    trainer.raw_model.register_forward_pre_hook(record)
    trainer.fit()
    assert seen == [64, 64, 64, 96, 96, 96]  # 6 steps of one batch each: the first half at 64 px
    # evaluated between epochs only once at imgsz (epoch 1 ends at step 2, still at 64 px)
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [("val/AP" in r) for r in records] == [False, True, True]
    saved = TrainConfig.load(trainer.run_dir / "train_config.yaml")
    assert saved.imgsz == 96 and saved.start_imgsz == 64


def test_bad_progressive_settings_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DecodetError, match="start_fraction must lie in"):
        TrainConfig(start_imgsz=64, start_fraction=1.0).validate()
    with pytest.raises(DecodetError, match=r"start_imgsz \(320\) must be smaller than imgsz \(256\)"):
        TrainConfig(imgsz=256, start_imgsz=320).validate()
    with pytest.raises(DecodetError, match="light recipe"):
        TrainConfig(transforms="detr", start_imgsz=320).validate()
    with pytest.raises(DecodetError, match="multiscale"):
        TrainConfig(multiscale=True, start_imgsz=320).validate()
    data = make_tiny_coco(tmp_path / "data")
    with pytest.raises(DecodetError, match="larger imgsz"):  # imgsz chosen by the recipe, not above start_imgsz
        Trainer(tiny_config(tmp_path, data, imgsz=None, start_imgsz=640))
