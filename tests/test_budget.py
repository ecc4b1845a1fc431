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
    # plan to end at half the budget: a test machine's step times vary more than a training run's
    monkeypatch.setattr(TrainingBudget, "MARGIN", 0.5)
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


def test_budget_sizes_then_only_shortens_the_schedule(monkeypatch) -> None:
    """1 s/step for the timed steps; one slow window (a one-off cost) shortens the schedule only
    by the time it really lost; sustained 2 s/step shortens it to still fit; faster again never
    lengthens it."""
    import torch

    from decodet.engine.optim import LRFactor

    monkeypatch.setattr(TrainingBudget, "SKIP", 0)
    monkeypatch.setattr(TrainingBudget, "STEPS", 10)
    budget = TrainingBudget(minutes=5.0, fit_schedule=True, device=torch.device("cpu"))
    clock = {"t": 0.0}
    monkeypatch.setattr(budget, "seconds", lambda: clock["t"])
    factor = LRFactor("cosine", total_steps=1000)
    usable = 300 * 0.97

    def run(steps: range, seconds_per_step: float) -> None:
        for step in steps:
            clock["t"] += seconds_per_step
            budget.step(factor, step, is_main=False)

    run(range(1, 22), 1.0)  # timing starts at step 1 (SKIP 0); windows end at steps 11 and 21
    assert factor.fitted and factor.total_steps == 11 + int(usable - 11)  # 291
    run(range(22, 32), 3.0)  # one slow window: 20 s lost, not 2 s more on every remaining step
    assert factor.total_steps == 31 + int(usable - 51)  # 271 (extrapolating 3 s/step would give 111)
    run(range(32, 62), 2.0)  # the machine stays busier: the median of the windows follows
    assert factor.total_steps == 51 + int((usable - 91) / 2.0)  # 151
    run(range(62, 92), 0.5)  # faster again: the schedule is not lengthened (no upward lr jump)
    assert factor.total_steps == 151
