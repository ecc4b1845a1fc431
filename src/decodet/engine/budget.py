"""A run's time budget: training time counted without evaluation and checkpoint writing, and,
on request, the lr schedule planned to end inside the budget on the machine it runs on.

``time_budget_min`` stops a run when its training steps have taken that long (a resumed run
continues the clock where its saved state left it).  With ``fit_schedule`` the steps are timed
in windows of ``STEPS`` (after ``SKIP`` start-up steps) and after every window the rest of the
schedule is re-planned to the steps that fit in the time left, longer when the steps have become
faster, shorter when slower: the cosine continues from where it is (:meth:`LRFactor.replan`), so
the rate never jumps, and it reaches its floor just inside the budget.  The configured total
(``epochs x steps per epoch``, ``max_steps``) stays an upper bound.

The step time is :func:`steady_step_time` of the recent windows: recent windows weigh more, and
windows far from the weighted median (an epoch's first batches, a loader restart, a stall) are
left out; their cost is already paid in the time left, and is not extrapolated over every
remaining step, so a transient slowdown at the start no longer decides the whole run (measured
case: docs/benchmarks.md).  Every process gets the same plan (the mean of their measurements).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import torch

from decodet.engine.ema import ModelEMA
from decodet.engine.optim import LRFactor, fit_total_steps
from decodet.engine.run_plan import ema_decay_for, ema_warmup_for, lr_warmup_for
from decodet.utils import distributed as D

log = logging.getLogger(__name__)


def steady_step_time(windows: Sequence[float], decay: float = 0.7, outlier: float = 1.2) -> float:
    """The steady seconds per step of per-window measurements (oldest first).

    The weighted median (window ``i`` from the end weighs ``decay ** i``: two slower windows in
    a row outweigh every older one) sets the level; windows more than ``outlier`` times off it
    are dropped, and the weighted mean of the rest is returned.
    """
    if not windows:
        raise ValueError("no step times measured")
    n = len(windows)
    weighted = sorted((float(r), decay ** (n - 1 - i)) for i, r in enumerate(windows))
    half, acc = sum(w for _, w in weighted) / 2, 0.0
    median = weighted[-1][0]
    for rate, w in weighted:
        acc += w
        if acc >= half:
            median = rate
            break
    kept = [(r, w) for r, w in weighted if median / outlier <= r <= median * outlier]
    return sum(r * w for r, w in kept) / sum(w for _, w in kept)


class TrainingBudget:
    """The training clock of one run and its budget (``minutes=None``: no budget).

    Args:
        max_steps: a cap on the planned total besides the schedule's own (``TrainConfig.max_steps``).
        clock: seconds of a monotonic clock (default :func:`time.monotonic`); tests inject a fake one.
    """

    SKIP, STEPS, MARGIN = 10, 20, 0.03  # start-up steps not timed, steps per timed window, budget fraction kept free
    WINDOWS = 12  # the step time is taken from the last WINDOWS windows (see steady_step_time)
    REPORT = 0.03  # a re-plan is logged when the total moved by more than this fraction since the last logged

    def __init__(
        self,
        minutes: float | None,
        fit_schedule: bool,
        device: torch.device,
        max_steps: int | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.minutes = minutes
        self.fit_schedule = fit_schedule and minutes is not None
        self.device = device
        self.max_steps = max_steps
        self.clock = clock
        self.start()

    def _now(self) -> float:
        return (self.clock or time.monotonic)()

    def start(self) -> None:
        """(Re)start the clock: no training time, no timed windows."""
        self.t_start = self._now()
        self.paused_s = 0.0
        self.spent_before: float | None = None  # training seconds of the run before this process (a resume)
        self.first_step = 0
        self.window: tuple[int, float] | None = None  # (step, training seconds) where the current window began
        self.windows: deque[float] = deque(maxlen=self.WINDOWS)  # seconds per step of recent windows
        self.logged_total: int | None = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, saving) is not training time."""
        t0 = self._now()
        try:
            yield
        finally:
            self.paused_s += self._now() - t0

    def seconds(self) -> float:
        """Training seconds of the run so far (those before a resume included)."""
        return (self.spent_before or 0.0) + self._now() - self.t_start - self.paused_s

    def over(self) -> bool:
        """Whether any process has used up the budget."""
        if self.minutes is None:
            return False
        return D.any_flag(self.seconds() >= self.minutes * 60, self.device)

    def step(self, factor: LRFactor, global_step: int, is_main: bool, ema: ModelEMA | None = None) -> None:
        """Call after each optimizer step.  Keeps the run's clock in ``factor`` (saved with the
        scheduler); with ``fit_schedule``, after every window of ``STEPS`` steps re-plans the
        schedule to the steps that fit (and the warm-ups the user left unset, ``ema``'s too)."""
        if self.minutes is None:
            return
        if self.spent_before is None:  # the first step of this process: continue a resumed run's clock
            self.spent_before = float(getattr(factor, "spent_s", 0.0))
            self.first_step = global_step
        now = self.seconds()
        factor.spent_s = now
        if not self.fit_schedule:
            return
        if self.window is None:
            if global_step - self.first_step >= self.SKIP:
                self.window = (global_step, now)
            return
        step0, t0 = self.window
        if global_step - step0 < self.STEPS:
            return
        rate, now = self._mean_over_processes((now - t0) / (global_step - step0), now)
        self.window = (global_step, now)
        self.windows.append(rate)
        self._plan(factor, global_step, now, is_main, ema)

    def _mean_over_processes(self, *values: float) -> list[float]:
        if not D.is_dist():
            return list(values)
        return D.all_reduce_mean(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

    def _plan(self, factor: LRFactor, step: int, now: float, is_main: bool, ema: ModelEMA | None) -> None:
        """Re-plan the rest of the schedule from ``step`` at ``now`` training seconds."""
        per_step = steady_step_time(self.windows)
        left = self.minutes * 60 * (1 - self.MARGIN) - now
        cap = factor.max_total if self.max_steps is None else min(factor.max_total, self.max_steps)
        total = fit_total_steps(cap, step, per_step, left)
        was, first = factor.total_steps, not factor.fitted
        factor.replan(step, total)
        factor.fitted = True
        sized = ""
        if getattr(factor, "auto_warmup", None):
            factor.resize_warmup(step, lr_warmup_for(total, factor.auto_warmup))
            sized += f", lr warm-up {factor.warmup_steps}"
        if ema is not None and getattr(factor, "auto_ema_warmup", None):
            ema.warmup = ema_warmup_for(total, factor.auto_ema_warmup)
            sized += f", EMA warm-up {ema.warmup}"
        if ema is not None and getattr(factor, "auto_ema_decay", False):
            ema.decay = round(ema_decay_for(total), 6)
            sized += f", EMA decay {ema.decay:g}"
        logged = self.logged_total
        if not is_main or (logged is not None and abs(total - logged) <= self.REPORT * logged):
            return
        self.logged_total = total
        if first:
            what = "sized to the time budget:"
        else:
            what = "lengthened to" if total > was else "shortened to" if total < was else "re-planned at"
        log.info("lr schedule %s %d steps (was %d; %.3f s/step measured at step %d, %.0f s of the budget left%s)",
                 what, total, was, per_step, step, left, sized)  # fmt: skip
