"""Watching training: TensorBoard event files, evaluation every epoch, early stopping, end-of-training plots."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from decodet.engine.early_stopping import EarlyStopping
from decodet.engine.train_config import TrainConfig, resolve
from decodet.engine.trainer import train
from decodet.errors import DecodetError
from test_trainer import make_tiny_coco, tiny_config, torchrun_two_processes


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_tiny_coco(tmp_path / "data")


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_early_stopping_counts_evaluations_without_improvement() -> None:
    stopper = EarlyStopping(patience=2)
    assert stopper.update(True, 0.3) is None
    assert stopper.update(False, 0.3) is None
    assert stopper.update(True, 0.4) is None  # an improvement resets the count
    assert stopper.update(False, 0.4) is None
    reason = stopper.update(False, 0.4)
    assert reason is not None and "did not improve on 0.4000 in 2 evaluation(s)" in reason
    restored = EarlyStopping(patience=2)
    restored.load_state_dict(stopper.state_dict())
    assert restored.stale == 2
    assert all(EarlyStopping(None).update(False, 0.1) is None for _ in range(5))


@pytest.mark.slow
def test_tensorboard_writes_losses_lrs_map_and_images_every_epoch(tmp_path: Path, data: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    every = resolve(TrainConfig()).eval_every
    assert every == 1  # evaluation every epoch by default (no time budget): the mAP plot is a curve
    cfg = tiny_config(tmp_path, data, epochs=2, eval_every=every, tensorboard=True, plots=True)
    final = train(cfg)
    run = Path(final["run_dir"])
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    lr_tags = {t for t in scalars if t.startswith("lr/")}
    assert {"step/loss", "train/loss", "train/loss_bbox", "val/AP", "val/AP50", "speed/images_per_s"} <= scalars
    records = _records(run)
    assert {k for k in records[0] if "/" in k} <= scalars  # every loss term, lr and COCO stat
    assert lr_tags and all(events.Scalars(t)[-1].value == pytest.approx(1e-3) for t in lr_tags)
    # 4 images, batch 2, 2 epochs: 4 optimizer steps, one loss each; one AP per epoch
    assert [e.step for e in events.Scalars("step/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("val/AP")] == [r["step"] for r in records] == [2, 4]
    for event, record in zip(events.Scalars("val/AP"), records):
        assert event.value == pytest.approx(record["val/AP"], abs=1e-6)
    images = events.Tags()["images"]
    assert sorted(images) == ["val_images/000.png", "val_images/001.png"]  # the 2 validation images
    shot = events.Images("val_images/000.png")
    assert [s.step for s in shot] == [2, 4] and (shot[0].width, shot[0].height) == (64, 64)
    # the end of training explains the final evaluation
    written = {p.name for p in (run / "eval").iterdir()}
    assert {"per_class.csv", "pr_curves.png", "confusion_matrix.csv", "confusion_matrix.png", "worst_images"} <= written


def test_tensorboard_missing_is_a_one_line_error(tmp_path: Path, data: Path, monkeypatch, capsys) -> None:
    """Without the tensorboard package, --tensorboard fails at once, before any run folder exists."""
    from decodet.cli import main

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed: import fails
    for name in [m for m in sys.modules if m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    args = ["train", "--data", str(data), "--tensorboard", "--project", str(tmp_path / "runs"), "--workers", "0"]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--tensorboard needs the tensorboard package" in lines[0] and "pip install" in lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_patience_stops_a_run_that_cannot_improve(tmp_path: Path, data: Path, caplog) -> None:
    # lr 0 and frozen BN: the weights never change, so the AP of the first evaluation is never beaten
    overrides = {**tiny_config(tmp_path, data).model_overrides, "freeze_backbone_bn": True}
    cfg = tiny_config(
        tmp_path, data, epochs=10, eval_every=1, lr=0.0, patience=2, plots=True, model_overrides=overrides
    )
    with caplog.at_level(logging.INFO, logger="decodet"):
        final = train(cfg)
    run = Path(final["run_dir"])
    assert final["epoch"] == 3 and final["step"] == 6  # best at epoch 1, then 2 evaluations without a better AP
    assert final["stop_reason"].startswith("early stopping") and "in 2 evaluation(s)" in final["stop_reason"]
    assert any(final["stop_reason"] in m and "best weights" in m for m in caplog.messages)
    records = _records(run)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["stop_reason"] == final["stop_reason"] and "stop_reason" not in records[0]
    with safe_open(run / "best.safetensors", "pt") as f:  # kept from the first (best) evaluation
        assert f.metadata()["epoch"] == "1"
    # the end-of-training plots describe the kept weights
    assert {"per_class.csv", "pr_curves.png", "confusion_matrix.csv", "worst_images"} <= {
        p.name for p in (run / "eval").iterdir()
    }
    state = torch.load(run / "last_state.pt", weights_only=True)
    assert state["early_stopping"] == {"stale": 2}


@pytest.mark.slow
def test_patience_stops_every_torchrun_process_at_the_same_epoch(tmp_path: Path, data: Path) -> None:
    overrides = {**tiny_config(tmp_path, data).model_overrides, "freeze_backbone_bn": True}
    cfg = tiny_config(
        tmp_path, data, epochs=10, eval_every=1, lr=0.0, patience=1, batch_size=1, plots=False, device="cpu",
        model_overrides=overrides,
    )  # fmt: skip
    results = torchrun_two_processes(tmp_path, cfg)
    for r in results.values():  # both stopped after the second epoch (patience 1), for the same reason
        assert r["epoch"] == 2 and r["stop_reason"] == results[0]["stop_reason"]
        assert r["stop_reason"].startswith("early stopping")


def test_patience_must_be_positive(tmp_path: Path, data: Path) -> None:
    with pytest.raises(DecodetError, match="patience must be >= 1"):
        train(tiny_config(tmp_path, data, patience=0))
