"""A run's plan: its lr schedule and EMA, with the warm-ups the user left unset sized to the run,
and the plan carried across ``--resume``.

A recipe's lr warm-up (200 steps from scratch) and the EMA's warm-up (2000 updates, DECO+'s
published value) suit runs of many thousand steps; a short run (a demo, a time budget) would
spend much of itself warming up.  When the user did not set them, the lr warm-up is at most
:data:`WARMUP_FRACTION` of the planned steps and the EMA warm-up at most
:data:`EMA_WARMUP_FRACTION`.  With ``fit_schedule`` the plan changes as steps are timed, and
:class:`~decodet.engine.budget.TrainingBudget` re-sizes both (without a jump in the rate).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from decodet.engine.ema import ModelEMA
from decodet.engine.optim import LRFactor, build_scheduler
from decodet.engine.train_config import TrainConfig
from decodet.utils import distributed as D

log = logging.getLogger(__name__)

WARMUP_FRACTION = 0.05  # an unset lr warm-up: at most this fraction of the planned steps
EMA_WARMUP_FRACTION = 0.10  # an unset EMA warm-up: at most this fraction of the planned steps ...
EMA_WARMUP_MAX = 2000  # ... and at most this many updates (DECO+'s published value)
# An unset EMA decay averages over about this fraction of the planned steps (1 / (1 - decay) updates),
# between EMA_HORIZON_MIN updates and DECO+'s published 0.9999 (10,000 updates).  With 0.9999 a run of
# 1,700 steps would end with an average of nearly all its weights, early ones included; the demo's
# measured 0.995 is an average over 200 updates, 10% of its run.  On a 3-minute run of the ``small`` set the
# demo's fixed 0.995 instead of this sizing changed AP by nothing measurable (0.015 both, docs/convergence.md).
EMA_HORIZON_FRACTION = 0.10
EMA_HORIZON_MIN = 20
EMA_DECAY_MAX = 0.9999

# LRFactor fields that a run sized to its time budget carries across a resume (its measured plan)
_PLAN_FIELDS = (
    "total_steps", "fitted", "warmup_steps", "warm_from", "warm_value", "anchor_step", "anchor_progress",
    "auto_warmup", "auto_ema_warmup", "auto_ema_decay",
)  # fmt: skip


def lr_warmup_for(planned_steps: int, configured: int) -> int:
    """The lr warm-up of a run of ``planned_steps``: ``configured`` (the recipe's), at most
    :data:`WARMUP_FRACTION` of the run (at least 1 step when ``configured`` is not 0)."""
    if configured <= 0:
        return 0
    return max(1, min(int(configured), round(WARMUP_FRACTION * planned_steps)))


def ema_warmup_for(planned_steps: int, configured: int = EMA_WARMUP_MAX) -> int:
    """The EMA warm-up of a run of ``planned_steps``: at most ``configured`` updates and at most
    :data:`EMA_WARMUP_FRACTION` of the run."""
    return max(1, min(int(configured), round(EMA_WARMUP_FRACTION * planned_steps)))


def ema_decay_for(planned_steps: int) -> float:
    """The EMA decay of a run of ``planned_steps``: an average over about :data:`EMA_HORIZON_FRACTION`
    of them, at least :data:`EMA_HORIZON_MIN` updates, at most :data:`EMA_DECAY_MAX`."""
    horizon = max(EMA_HORIZON_MIN, EMA_HORIZON_FRACTION * planned_steps)
    return min(EMA_DECAY_MAX, 1.0 - 1.0 / horizon)


def build_schedule(
    given: TrainConfig, cfg: TrainConfig, model: nn.Module, optimizer: Optimizer, steps_per_epoch: int
) -> tuple[TrainConfig, LambdaLR, ModelEMA | None]:
    """The lr scheduler and EMA (``None`` without EMA) of a run; returns them with ``cfg`` holding
    the warm-ups used.

    Args:
        given: the config as the user gave it (before :func:`~decodet.engine.train_config.resolve`):
            a ``warmup_steps`` of ``None`` there, and an ``ema_warmup`` of ``None``, are sized to
            the planned steps (``epochs x steps_per_epoch``, at most ``max_steps``), and so is an
            ``ema_decay`` of ``None``.
        cfg: the resolved config.
    """
    total = steps_per_epoch * cfg.epochs
    planned = total if cfg.max_steps is None else min(total, cfg.max_steps)
    auto_warmup = cfg.warmup_steps if given.warmup_steps is None and cfg.warmup_steps else None
    auto_ema = EMA_WARMUP_MAX if cfg.ema and cfg.ema_warmup is None else None
    changes: dict[str, Any] = {}
    if auto_warmup:
        changes["warmup_steps"] = lr_warmup_for(planned, auto_warmup)
    if cfg.ema_warmup is None:
        changes["ema_warmup"] = ema_warmup_for(planned)
    auto_decay = bool(cfg.ema and given.ema_decay is None)
    if auto_decay:
        changes["ema_decay"] = round(ema_decay_for(planned), 6)
    cfg = dataclasses.replace(cfg, **changes)
    if D.is_main() and (changes.get("warmup_steps", auto_warmup) != auto_warmup or auto_ema):
        log.info(
            "warm-ups sized to %d planned steps: lr %d steps (recipe: %s), EMA %s",
            planned, cfg.warmup_steps, auto_warmup,
            f"{cfg.ema_warmup} updates, decay {cfg.ema_decay:g}" if auto_ema else "off",
        )  # fmt: skip
    scheduler = build_scheduler(
        optimizer,
        cfg.schedule,
        steps_per_epoch=steps_per_epoch,
        epochs=cfg.epochs,
        warmup_steps=cfg.warmup_steps,
        drop_epoch=cfg.lr_drop_epoch,
        drop_factor=cfg.lr_drop_factor,
        min_ratio=cfg.min_lr_ratio,
    )  # max_steps / the time budget only stop training; the schedule spans ``epochs``
    if cfg.fit_schedule:  # the budget's plan re-sizes the warm-ups the user left unset
        factor: LRFactor = scheduler.lr_lambdas[0]
        factor.auto_warmup, factor.auto_ema_warmup, factor.auto_ema_decay = auto_warmup, auto_ema, auto_decay
    ema = ModelEMA(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema else None
    return cfg, scheduler, ema


def restore_schedule(scheduler: LambdaLR, optimizer: Optimizer, saved: dict[str, Any], keep_fitted: bool) -> None:
    """Continue the saved step count; the schedule's shape follows the current config (so
    ``--resume RUN --epochs N`` stretches it), which is the saved one unless changed.  Carried
    over: the run's budget clock and, with ``keep_fitted``, the whole plan a time budget
    re-planned (total, warm-up, anchors), so the rate continues where it was.  A plan longer
    than the current config's total is re-planned to end there."""
    factor: LRFactor = scheduler.lr_lambdas[0]
    old = (saved.get("lr_lambdas") or [None])[0] or {}
    carried = {k: old[k] for k in ("spent_s",) if k in old}
    if keep_fitted and old.get("fitted"):
        carried.update({k: old[k] for k in _PLAN_FIELDS if k in old})
    factor.__dict__.update(carried)
    wanted = dict(factor.__dict__)
    scheduler.load_state_dict(saved)
    if keep_fitted and factor.__dict__.get("fitted"):  # keep the total the run measured
        wanted.update(total_steps=factor.total_steps, fitted=True)
    if factor.__dict__ != wanted:
        log.info("lr schedule changed on resume: %s -> %s", factor.__dict__, wanted)
        factor.__dict__.update(wanted)
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    step = scheduler.last_epoch
    if factor.fitted and factor.total_steps > factor.max_total:
        log.info("lr schedule re-planned on resume: %d -> %d steps (the configured total)", factor.total_steps,
                 factor.max_total)  # fmt: skip
        factor.replan(step, factor.max_total)  # continuous at ``step``: the current rates stand
