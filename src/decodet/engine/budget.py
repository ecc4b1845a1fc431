"""A run's time budget: training time counted without evaluation and checkpoint writing, and,
on request, the lr schedule sized to end inside the budget on the machine it runs on.

``time_budget_min`` stops a run when its training steps have taken that long.  With
``fit_schedule`` the first steps are timed (after ``SKIP`` start-up steps, ``STEPS`` of them),
and the schedule's total is fixed to the steps that fit, so a cosine schedule reaches its floor
on a slow machine too, and a fast one runs the configured schedule.  Every process gets the
same total (the mean of their step times).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections import deque
from collections.abc import Iterator

import torch

from decodet.engine import distributed as D
from decodet.engine.optim import LRFactor, fit_total_steps

log = logging.getLogger(__name__)


class TrainingBudget:
    """The training clock of one run and its budget (``minutes=None``: no budget)."""

    SKIP, STEPS, MARGIN = 10, 30, 0.03  # start-up steps not timed, steps timed, budget fraction kept free
    WINDOWS = 5  # the step time is the median over the last WINDOWS timed windows of STEPS steps

    def __init__(self, minutes: float | None, fit_schedule: bool, device: torch.device) -> None:
        self.minutes = minutes
        self.fit_schedule = fit_schedule and minutes is not None
        self.device = device
        self.start()

    def start(self) -> None:
        self.t_start = time.monotonic()
        self.paused_s = 0.0
        self.fit_clock: tuple[int, float] | None = None  # (step, training seconds) where timing began
        self.windows: deque[float] = deque(maxlen=self.WINDOWS)  # seconds per step of recent windows

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, saving) is not training time."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.paused_s += time.monotonic() - t0

    def seconds(self) -> float:
        """Training seconds so far."""
        return time.monotonic() - self.t_start - self.paused_s

    def over(self) -> bool:
        """Whether any process has used up the budget."""
        if self.minutes is None:
            return False
        return D.any_flag(self.seconds() >= self.minutes * 60, self.device)

    def step(self, factor: LRFactor, global_step: int, is_main: bool) -> None:
        """Call after each optimizer step.  Times ``STEPS`` steps (after ``SKIP``), then fixes
        ``factor.total_steps`` to what fits; every ``STEPS`` steps after that, shortens it again if
        the steps have become slower (a busier machine: the median of the last ``WINDOWS``
        windows), so the schedule still ends in the budget."""
        if not self.fit_schedule:
            return
        if self.fit_clock is None:
            if global_step >= self.SKIP and not factor.fitted:
                self.fit_clock = (global_step, self.seconds())
            elif factor.fitted:  # resumed with a fitted total: re-check from here on
                self.fit_clock = (global_step, self.seconds())
            return
        step0, t0 = self.fit_clock
        if global_step - step0 < self.STEPS:
            return
        now = self.seconds()
        self.windows.append(
            float(D.all_reduce_mean(torch.tensor((now - t0) / (global_step - step0), device=self.device)))
        )
        self.fit_clock = (global_step, now)
        # The median of recent windows, not the last one: a one-off cost (an epoch's first
        # batches, a loader restart) is already paid in ``now`` and must not be extrapolated over
        # every remaining step, while a machine that stays slower moves the median within a few
        # windows.  (One run cut its schedule from 1,325 to 1,243 steps on the window after an
        # evaluation: 0.556 s/step there, 0.50 s before and after.)
        per_step = statistics.median(self.windows)
        left = self.minutes * 60 * (1 - self.MARGIN) - now
        planned = factor.total_steps
        fitted = fit_total_steps(planned, global_step, per_step, left)
        if factor.fitted and fitted >= planned:
            return  # on time: the schedule only ever gets shorter once fixed (no lr jumps upwards)
        factor.total_steps = fitted
        if is_main:
            what = "shortened to" if factor.fitted else "sized to the time budget:"
            log.info("lr schedule %s %d steps (%.3f s/step measured; was %d)", what, fitted, per_step, planned)
        factor.fitted = True
