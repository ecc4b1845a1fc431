"""A time-budgeted run sizes its lr schedule to the budget, so it completes on any machine; the
demo's between-epoch evaluations on a validation subset draw a curve."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from decodet.engine.budget import TrainingBudget
from decodet.engine.optim import fit_total_steps
from decodet.engine.trainer import Trainer
from test_trainer import make_tiny_coco, tiny_config


def test_fit_total_steps_bounds() -> None:
    assert fit_total_steps(1000, 40, 0.5, 100.0) == 240  # 200 more steps fit
    assert fit_total_steps(100, 40, 0.5, 100.0) == 100  # a fast machine runs the planned schedule
    assert fit_total_steps(1000, 40, 0.5, -3.0) == 41  # over budget already: end now


@pytest.mark.slow
def test_budgeted_run_completes_its_schedule(tmp_path: Path, caplog, monkeypatch) -> None:
    monkeypatch.setattr(TrainingBudget, "SKIP", 2)
    monkeypatch.setattr(TrainingBudget, "STEPS", 4)
    data = make_tiny_coco(tmp_path / "data", n_train=4, n_val=2)  # 2 steps per epoch
    cfg = tiny_config(
        tmp_path,
        data,
        epochs=200,  # far more than the budget allows
        lr=1e-3,
        schedule="cosine",
        min_lr_ratio=0.05,
        time_budget_min=0.1,  # 6 s of training steps
        fit_schedule=True,
        eval_every=1,
        eval_subset=1,
    )
    trainer = Trainer(cfg)
    planned = trainer.scheduler.lr_lambdas[0].total_steps
    with caplog.at_level(logging.INFO):
        final = trainer.fit()
    factor = trainer.scheduler.lr_lambdas[0]
    assert factor.fitted and final["step"] == factor.total_steps < planned
    assert "lr schedule sized to the time budget" in caplog.text
    assert "the schedule sized to the time budget is complete" in caplog.text
    records = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    lr_keys = [k for k in records[-1] if k.startswith("lr/")]
    assert lr_keys and all(records[-1][k] == pytest.approx(1e-3 * 0.05, rel=1e-6) for k in lr_keys)  # the floor
    # between epochs: evaluated on 1 image (a curve point, not a "best"); at the end on all of them
    assert records[0]["val/subset"] == 1 and "val/AP" in records[0]
    assert "val/subset" not in records[-1] and "val/AP" in records[-1]
    assert final["best_AP"] == records[-1]["val/AP"]
