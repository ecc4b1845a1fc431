"""A time-budgeted run plans its lr schedule to the budget, so it completes on any machine: the
plan follows the measured step time both ways without a jump in the rate, ends at the floor
inside the budget and survives a resume.  The demo's between-epoch evaluations on a validation
subset draw a curve."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from decodet.engine.budget import TrainingBudget, steady_step_time
from decodet.engine.optim import LRFactor, build_scheduler, fit_total_steps
from decodet.engine.run_plan import build_schedule, ema_decay_for, ema_warmup_for, lr_warmup_for, restore_schedule
from decodet.engine.train_config import TrainConfig
from decodet.engine.trainer import Trainer
from test_trainer import make_tiny_coco, tiny_config

MINUTES, WARMUP, FLOOR = 12.5, 100, 0.05  # the demo's budget, warm-up and cosine floor
CPU = torch.device("cpu")


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _scheduler(epochs: int = 12, steps_per_epoch: int = 375) -> LambdaLR:
    """The demo's schedule (base lr 1, so the lr is the factor) over a configured 4,500 steps."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    return build_scheduler(opt, "cosine", steps_per_epoch, epochs, warmup_steps=WARMUP, min_ratio=FLOOR)


def _lr(sched: LambdaLR) -> float:
    return sched.optimizer.param_groups[0]["lr"]


def _train(
    sched: LambdaLR,
    budget: TrainingBudget,
    clock: FakeClock,
    step_seconds: Callable[[int], float],
    until: int | None = None,
    after_step: Callable[[int], None] | None = None,
) -> list[float]:
    """The trainer's loop without a model: each step takes ``step_seconds(step)`` on ``clock``,
    then the scheduler and the budget step and the trainer's stop rules apply (``until``: stop
    there as a crash would).  Returns the lr before the first step and after each."""
    factor = sched.lr_lambdas[0]
    lrs = [_lr(sched)]
    while True:
        clock.t += step_seconds(sched.last_epoch)
        sched.optimizer.step()
        sched.step()
        step = sched.last_epoch
        budget.step(factor, step, is_main=True)
        assert factor(step) == pytest.approx(_lr(sched), abs=1e-12)  # a re-plan keeps the current rate
        lrs.append(_lr(sched))
        if after_step is not None:
            after_step(step)
        if (factor.fitted and step >= factor.total_steps) or budget.over() or step == until:
            return lrs


def _assert_complete(sched: LambdaLR, budget: TrainingBudget, lrs: list[float]) -> None:
    """Ended by the schedule at its floor, inside the budget and using >= 95% of it, without a jump."""
    factor = sched.lr_lambdas[0]
    assert sched.last_epoch == factor.total_steps < factor.max_total  # the budget decided the length
    assert lrs[-1] == pytest.approx(FLOOR, abs=1e-12)
    used = budget.seconds() / (MINUTES * 60)
    assert 0.95 <= used <= 1.0, used
    # a warm-up step raises the factor by 1 / WARMUP; after it, a cosine step lowers it by at most
    # (1 - floor) * pi / 2 / (steps it spans): a re-plan may steepen that a little, never jump
    ramp = [abs(b - a) for a, b in zip(lrs[: WARMUP + 1], lrs[1 : WARMUP + 1])]
    cosine = [abs(b - a) for a, b in zip(lrs[WARMUP:], lrs[WARMUP + 1 :])]
    assert max(ramp) <= 1 / WARMUP + 1e-9
    assert max(cosine) <= 2.5 * (1 - FLOOR) * math.pi / 2 / (factor.total_steps - WARMUP), max(cosine)


def test_fit_total_steps_bounds() -> None:
    assert fit_total_steps(1000, 40, 0.5, 100.0) == 240  # 200 more steps fit
    assert fit_total_steps(100, 40, 0.5, 100.0) == 100  # a fast machine runs the planned schedule
    assert fit_total_steps(1000, 40, 0.5, -3.0) == 41  # over budget already: end now


def test_steady_step_time_ignores_one_off_windows_and_follows_lasting_changes() -> None:
    assert steady_step_time([0.4] * 6 + [0.9]) == pytest.approx(0.4)  # an epoch start, a loader restart
    assert steady_step_time([1.2] * 3 + [0.4] * 2) == pytest.approx(0.4)  # faster for two windows: follows
    assert steady_step_time([0.4] * 8 + [0.8] * 2) == pytest.approx(0.8)  # slower for two windows: follows
    assert steady_step_time([0.40, 0.42, 0.41]) == pytest.approx(0.41, abs=0.01)  # noise is averaged


def test_replan_and_warmup_resize_are_continuous() -> None:
    factor = LRFactor("cosine", total_steps=1000, warmup_steps=100, min_ratio=0.1)
    before = factor(500)
    factor.replan(500, 700)  # shorter: the rest of the cosine over 200 steps
    assert factor(500) == pytest.approx(before) and factor(700) == pytest.approx(0.1)
    assert factor(600) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (0.4444 + 0.5556 / 2))), abs=1e-3)
    factor.replan(600, 5000)  # longer, but never past the configured total
    assert factor.total_steps == 1000 and factor(1000) == pytest.approx(0.1)
    warm = LRFactor("cosine", total_steps=1000, warmup_steps=200)
    value = warm(39)
    warm.resize_warmup(39, 50)  # from 0.2 at step 39 to 1 at 50 is too steep: 2x a 50-step ramp's slope
    assert warm(39) == pytest.approx(value) and warm.warmup_steps == 40 + 20
    assert warm(58) == pytest.approx(0.2 + 0.8 * 19 / 20) and warm(59) == pytest.approx(1.0)
    warm.resize_warmup(45, 50)  # re-aimed at the same length: unchanged
    assert warm.warmup_steps == 60 and warm(58) == pytest.approx(0.2 + 0.8 * 19 / 20)


def test_budget_replans_both_ways_from_the_current_rate(monkeypatch) -> None:
    """1 s/step for the timed steps sizes the schedule; one slow window (a one-off cost) shortens
    it only by the time it really lost; sustained 2 s/step shortens it to still fit; faster
    steps lengthen it again, each time from the rate reached."""
    monkeypatch.setattr(TrainingBudget, "SKIP", 0)
    monkeypatch.setattr(TrainingBudget, "STEPS", 10)
    clock = FakeClock()
    budget = TrainingBudget(minutes=5.0, fit_schedule=True, device=CPU, clock=clock)
    factor = LRFactor("cosine", total_steps=1000)
    usable = 300 * 0.97

    def run(steps: range, seconds_per_step: float) -> None:
        for step in steps:
            clock.t += seconds_per_step
            before = factor(step)
            budget.step(factor, step, is_main=False)
            assert factor(step) == pytest.approx(before)

    run(range(1, 22), 1.0)  # timing starts at step 1 (SKIP 0); windows end at steps 11 and 21
    assert factor.fitted and factor.total_steps == 11 + int(usable - 11)  # 291
    run(range(22, 32), 3.0)  # one slow window: 20 s lost, not 2 s more on every remaining step
    assert factor.total_steps == 31 + int(usable - 51)  # 271 (extrapolating 3 s/step would give 111)
    run(range(32, 62), 2.0)  # the machine stays busier: the plan follows
    assert factor.total_steps == pytest.approx(61 + (usable - 111) / 2.0, abs=3)  # ~151
    shortest = factor.total_steps
    run(range(62, 92), 0.5)  # faster again: the rest of the schedule is lengthened
    assert factor.total_steps == pytest.approx(91 + (usable - 126) / 0.5, abs=3) and factor.total_steps > shortest


def _slow_start(step: int) -> float:
    return 1.226 if step < 60 else 0.40  # a pip install during the first minute, then 0.40 s/step


@pytest.mark.parametrize("scenario", ["slow-start", "fast-then-slow", "pause-and-stall"])
def test_budget_is_spent_and_the_schedule_completes(scenario: str) -> None:
    clock = FakeClock()
    sched = _scheduler()
    budget = TrainingBudget(MINUTES, fit_schedule=True, device=CPU, clock=clock)
    t0, after_step = clock.t, None
    if scenario == "slow-start":
        step_seconds = _slow_start
    elif scenario == "fast-then-slow":
        step_seconds = lambda step: 0.3 if clock.t - t0 < 300 else 0.6  # noqa: E731
    else:

        def step_seconds(step: int) -> float:  # a genuine 40 s stall, a 2 s loader restart each epoch
            return 0.43 + (40.0 if step == 800 else 0.0) + (2.0 if step % 375 == 0 else 0.0)

        def after_step(step: int) -> None:
            if step == 500:
                with budget.paused():  # an evaluation: not training time
                    clock.t += 120.0

    lrs = _train(sched, budget, clock, step_seconds, after_step=after_step)
    _assert_complete(sched, budget, lrs)
    if scenario == "slow-start":  # sized from the slow steps first (593), then to the steady ones
        assert sched.lr_lambdas[0].total_steps > 1600
    if scenario == "pause-and-stall":
        assert clock.t - t0 == pytest.approx(budget.seconds() + 120.0)  # the evaluation is not counted


def test_budget_plan_survives_a_resume() -> None:
    """Saved mid-run (its clock and plan in the scheduler's state), resumed an hour later on a
    slower machine: the rate continues where it was, the clock counts the first part, and the
    schedule ends at its floor inside the budget."""
    clock = FakeClock()
    sched = _scheduler()
    budget = TrainingBudget(MINUTES, fit_schedule=True, device=CPU, clock=clock)
    first = _train(sched, budget, clock, lambda step: 0.40, until=700)
    saved_optimizer, saved = sched.optimizer.state_dict(), sched.state_dict()
    assert sched.lr_lambdas[0].fitted and 0.3 < saved["lr_lambdas"][0]["spent_s"] / (MINUTES * 60) < 0.4
    clock.t += 3600.0  # down for an hour

    resumed = _scheduler()  # as the trainer rebuilds it from the config, then restores
    resumed.optimizer.load_state_dict(saved_optimizer)
    restore_schedule(resumed, resumed.optimizer, saved, keep_fitted=True)
    assert _lr(resumed) == pytest.approx(first[-1]) and resumed.lr_lambdas[0].total_steps > 1700
    budget = TrainingBudget(MINUTES, fit_schedule=True, device=CPU, clock=clock)
    rest = _train(resumed, budget, clock, lambda step: 0.45)
    assert resumed.lr_lambdas[0].total_steps < 1720  # re-planned for the slower steps
    _assert_complete(resumed, budget, first + rest[1:])


def test_configured_total_and_max_steps_bound_the_plan() -> None:
    clock = FakeClock()
    sched = _scheduler(epochs=2)  # 750 steps: a fast machine runs the configured schedule
    budget = TrainingBudget(MINUTES, fit_schedule=True, device=CPU, clock=clock)
    lrs = _train(sched, budget, clock, lambda step: 0.40)
    assert sched.last_epoch == 750 and lrs[-1] == pytest.approx(FLOOR)
    sched = _scheduler()
    budget = TrainingBudget(MINUTES, fit_schedule=True, device=CPU, max_steps=1000, clock=clock)
    lrs = _train(sched, budget, clock, lambda step: 0.40)
    assert sched.last_epoch == 1000 and lrs[-1] == pytest.approx(FLOOR)  # max_steps ends at the floor


def test_warmups_left_unset_are_sized_to_the_run(caplog) -> None:
    """An unset lr warm-up is at most 5% of the planned steps and an unset EMA warm-up at most
    10%; values the user set stay; with fit_schedule the budget's plan re-sizes them."""
    assert (lr_warmup_for(1500, 200), lr_warmup_for(100_000, 200), lr_warmup_for(1500, 0)) == (75, 200, 0)
    assert (ema_warmup_for(1500), ema_warmup_for(100_000)) == (150, 2000)
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    given = TrainConfig(epochs=12, ema=True, schedule="cosine", time_budget_min=MINUTES, fit_schedule=True)
    cfg = given.replace(warmup_steps=200)  # as resolve() fills it from the from-scratch recipe
    cfg, sched, ema = build_schedule(given, cfg, model, opt, steps_per_epoch=375)
    assert (cfg.warmup_steps, cfg.ema_warmup, ema.warmup) == (200, 450, 450)  # 4,500 steps configured
    assert ema.decay == cfg.ema_decay == pytest.approx(1 - 1 / 450, abs=1e-6)  # an average over 10% of them
    clock = FakeClock()
    budget = TrainingBudget(MINUTES, fit_schedule=True, device=CPU, clock=clock)
    factor, lrs = sched.lr_lambdas[0], [_lr(sched)]
    for step in range(1, 200):
        clock.t += 0.43
        opt.step()
        sched.step()
        budget.step(factor, step, is_main=True, ema=ema)
        lrs.append(_lr(sched))
    assert factor.total_steps == pytest.approx(750 * 0.97 / 0.43, abs=2)  # 1,691
    assert factor.warmup_steps < 0.06 * factor.total_steps and ema.warmup == ema_warmup_for(factor.total_steps)
    assert ema.decay == pytest.approx(ema_decay_for(factor.total_steps), abs=1e-6)
    assert ema.decay < 1 - 1 / 450  # an average over 10% of the 1,691 steps that fit
    assert max(b - a for a, b in zip(lrs, lrs[1:])) < 0.03 and lrs[-1] <= 1.0  # a steeper ramp, no jump
    user = given.replace(warmup_steps=200, ema_warmup=100, ema_decay=0.999)
    cfg, sched, ema = build_schedule(user, user, model, opt, steps_per_epoch=375)
    assert (cfg.warmup_steps, ema.warmup, sched.lr_lambdas[0].auto_warmup) == (200, 100, None)
    assert ema.decay == 0.999 and not sched.lr_lambdas[0].auto_ema_decay


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
