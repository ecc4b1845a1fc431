"""Checkpoint + resume: an interrupted run continued with --resume ends with the same weights
as an uninterrupted one (CPU, same seed), at an epoch boundary and part-way through an epoch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from decodet.engine.train_config import TrainConfig, parse_train_args
from decodet.engine.trainer import train
from decodet.errors import DecodetError
from test_trainer import make_tiny_coco, tiny_config


def _state(run_dir: str | Path) -> dict:
    return torch.load(Path(run_dir) / "last_state.pt", weights_only=True)


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_tiny_coco(tmp_path / "data", n_train=6)  # batch 2: 3 steps per epoch


def _config(tmp_path: Path, data: Path, name: str, **changes) -> TrainConfig:
    # augmentation, EMA, a warm-up + cosine schedule and drop-free BN training: every piece of state matters
    base = {"epochs": 2, "ema": True, "ema_warmup": 3, "schedule": "cosine", "warmup_steps": 2, "name": name}
    return tiny_config(tmp_path, data, **{**base, **changes})


@pytest.mark.parametrize("stop_after", [3, 4], ids=["epoch-boundary", "mid-epoch"])
def test_resume_continues_exactly(tmp_path: Path, data: Path, stop_after: int) -> None:
    straight = train(_config(tmp_path, data, "straight"))
    assert straight["step"] == 6

    interrupted = train(_config(tmp_path, data, "resumed", max_steps=stop_after))
    assert interrupted["step"] == stop_after
    assert _state(interrupted["run_dir"])["batches_done"] == (0 if stop_after == 3 else 1)
    resumed = train(_config(tmp_path, data, "resumed", resume=interrupted["run_dir"]))
    assert resumed["run_dir"] == interrupted["run_dir"] and resumed["step"] == 6

    a, b = _state(straight["run_dir"]), _state(resumed["run_dir"])
    _assert_same_tensors(a["model"], b["model"])
    _assert_same_tensors(a["ema"]["module"], b["ema"]["module"])
    assert a["ema"]["updates"] == b["ema"]["updates"] == 6
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    # the metrics file continues: one record per (partial) epoch, steps increasing
    from decodet.engine.metrics_log import read_metrics

    steps = [r["step"] for r in read_metrics(resumed["run_dir"])]
    assert steps == sorted(steps) and steps[-1] == 6


def test_resume_from_the_command_line_reads_the_saved_config(tmp_path: Path, data: Path) -> None:
    first = train(_config(tmp_path, data, "cli", epochs=1))
    run = Path(first["run_dir"])
    cfg = parse_train_args(["--resume", str(run), "--epochs", "2"])  # the rest comes from train_config.yaml
    assert (cfg.model, cfg.imgsz, cfg.epochs, cfg.ema_warmup) == ("deco_tiny", 64, 2, 3)
    again = train(cfg)
    assert again["step"] == 6 and again["run_dir"] == str(run)
    # resuming a finished run trains nothing more
    assert train(cfg.replace(resume=str(run / "last_state.pt")))["run_dir"] == str(run)
    assert _state(run)["global_step"] == 6


def test_resume_errors_name_the_file(tmp_path: Path, data: Path) -> None:
    with pytest.raises(DecodetError, match="training state not found"):
        train(_config(tmp_path, data, "x", resume=str(tmp_path / "nowhere")))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "last_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DecodetError, match="unreadable training state") as err:
        train(_config(tmp_path, data, "x", resume=str(bad)))
    assert str(bad / "last_state.pt") in str(err.value)
    with pytest.raises(DecodetError, match="no train_config.yaml"):
        parse_train_args(["--resume", str(bad)])


def test_a_kill_between_the_epoch_record_and_the_checkpoint_loses_no_record(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The epoch's record is written before its checkpoint: a kill between the two leaves a record
    past the saved step, which the resume drops and writes again (the other order lost it)."""
    from decodet.engine import trainer as trainer_module
    from decodet.engine.metrics_log import read_metrics

    real_save = trainer_module.save_checkpoint

    def killed_at_the_second_save(trainer, improved):
        if trainer.epoch == 2:  # the last epoch's record is logged, its checkpoint not yet written
            raise KeyboardInterrupt
        real_save(trainer, improved)

    monkeypatch.setattr(trainer_module, "save_checkpoint", killed_at_the_second_save)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path, data, "killed"))
    run = tmp_path / "runs" / "killed"
    assert [r["step"] for r in read_metrics(run)] == [3, 6] and _state(run)["global_step"] == 3
    monkeypatch.setattr(trainer_module, "save_checkpoint", real_save)
    resumed = train(_config(tmp_path, data, "killed", resume=str(run)))
    assert resumed["step"] == 6
    assert [r["step"] for r in read_metrics(run)] == [3, 6]  # replayed, once
