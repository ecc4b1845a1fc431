"""A run's training state on disk: reading ``last_state.pt`` back and continuing its schedule.

The trainer writes the state (:meth:`~decodet.engine.trainer.Trainer._save`); ``--resume`` and
torchrun restarts read it here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from decodet.errors import DecodetError
from decodet.io.checkpoint import safe_torch_load

log = logging.getLogger(__name__)

STATE_FILE = "last_state.pt"
STATE_VERSION = 1


def load_state(resume: str | Path) -> dict[str, Any]:
    """The training state of a run folder (or its ``last_state.pt``), checked; ``path`` added."""
    path = Path(resume)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise DecodetError("cannot resume: training state not found (expected a run folder or its last_state.pt)", path)
    try:
        state = safe_torch_load(path)
    except DecodetError as e:  # truncated / foreign file
        raise DecodetError(f"cannot resume: unreadable training state ({e.message})", path) from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise DecodetError("cannot resume: not a decodet training state", path)
    state["path"] = str(path)
    return state


def restore_scheduler(scheduler: LambdaLR, optimizer: Optimizer, saved: dict[str, Any], keep_fitted: bool) -> None:
    """Continue the saved step count; the schedule's shape follows the current config (so
    ``--resume RUN --epochs N`` stretches it), which is the saved one unless changed.  With
    ``keep_fitted``, a total sized to a time budget (:mod:`decodet.engine.budget`) is kept."""
    factor = scheduler.lr_lambdas[0]
    wanted = dict(factor.__dict__)
    scheduler.load_state_dict(saved)
    if keep_fitted and factor.__dict__.get("fitted"):  # keep the total the run measured
        wanted.update(total_steps=factor.total_steps, fitted=True)
    if factor.__dict__ != wanted:
        log.info("lr schedule changed on resume: %s -> %s", factor.__dict__, wanted)
        factor.__dict__.update(wanted)
        step = scheduler.last_epoch
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * factor(step)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
