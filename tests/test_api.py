"""The Python training API: ``decodet.train(...)`` then ``decodet.Detector(run_folder)``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import decodet
from decodet.engine.train_config import TrainConfig
from decodet.errors import DecodetError
from test_trainer import TINY, make_tiny_coco


def test_train_two_steps_then_detect_from_the_run_folder(tmp_path: Path) -> None:
    data = make_tiny_coco(tmp_path / "data")
    base = tmp_path / "base.yaml"  # a config file, as `decodet train --config`; keyword options override it
    base.write_text(yaml.safe_dump({"lr": 1e-3, "epochs": 5, "model_overrides": TINY, "schedule": "constant"}))
    result = decodet.train(
        model="deco_tiny",
        data=data,  # a Path is fine
        epochs=1,
        config=base,
        max_steps=2,
        batch_size=2,
        imgsz=64,
        workers=0,
        threads=1,
        warmup_steps=0,
        project=tmp_path / "runs",
        name="api",
    )
    assert isinstance(result, decodet.TrainResult)
    assert result.run_dir == tmp_path / "runs" / "api"
    assert result.best == result.run_dir / "best.safetensors" and result.best.is_file()
    assert result.last.is_file()
    assert result.metrics["step"] == 2 and 0.0 <= result.metrics["AP"] <= 1.0
    assert result.metrics["best_AP"] == result.metrics["AP"]
    saved = TrainConfig.load(result.run_dir / "train_config.yaml")
    assert (saved.lr, saved.epochs, saved.max_steps, saved.model_overrides["hidden_dim"]) == (1e-3, 1, 2, 64)

    image = data / "val" / "000.png"
    from_folder = decodet.Detector(result.run_dir, score_threshold=0.0, max_det=10)(image)[0]
    from_file = decodet.Detector(result.best, score_threshold=0.0, max_det=10)(image)[0]
    assert from_folder["boxes"].shape == (10, 4)
    assert torch.equal(from_folder["boxes"], from_file["boxes"])
    assert set(from_folder["names"]) <= {"red", "green"}


def test_unknown_option_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(DecodetError, match=r"unknown training option\(s\) batchsize; valid options: .*batch_size"):
        decodet.train(model="deco_tiny", data=tmp_path, batchsize=2)


def test_bad_values_are_decodet_errors(tmp_path: Path) -> None:
    with pytest.raises(DecodetError, match="epochs must be >= 1"):
        decodet.train(model="deco_tiny", data=tmp_path, epochs=0)
    with pytest.raises(DecodetError, match="unknown model 'deco_nope'"):
        decodet.train(model="deco_nope", data=make_tiny_coco(tmp_path / "d"), project=tmp_path / "runs")
