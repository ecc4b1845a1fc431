"""A run's weights and training state, written at each epoch end (rank 0, atomic writes) and read
back on ``--resume`` and by torchrun restarts (every rank's RNG states: mid-epoch resume is exact).
The functions take the running ``engine.trainer.Trainer`` (typed ``Any``: this module sits below it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from decodet.config import config_to_dict
from decodet.engine.run_plan import restore_schedule
from decodet.engine.seeding import get_rng_state
from decodet.errors import DecodetError
from decodet.io.atomic import atomic_open
from decodet.io.checkpoint import safe_torch_load, save_model
from decodet.utils import distributed as D

log = logging.getLogger(__name__)

LAST_WEIGHTS = "last.safetensors"
BEST_WEIGHTS = "best.safetensors"
BEST_METRIC = "AP"
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


def save_checkpoint(trainer: Any, improved: bool) -> None:
    """Write last (and, when ``improved``, best) weights, then the training state."""
    t = trainer
    rng = D.all_gather_object(t.stop_rng or get_rng_state())  # every rank's, for a mid-epoch resume
    t.stop_rng = None
    if not t.is_main:
        return
    weights = t.ema.module if t.ema is not None else t.raw_model
    extra = {"epoch": str(t.epoch), "step": str(t.global_step), "ema": str(t.ema is not None)}
    save_model(weights, t.run_dir / LAST_WEIGHTS, extra=extra)
    if improved:
        save_model(weights, t.run_dir / BEST_WEIGHTS, extra={**extra, BEST_METRIC: f"{t.best:.6f}"})
    state = {
        "version": STATE_VERSION,
        "epoch": t.epoch,
        "batches_done": t.batches_done,
        "global_step": t.global_step,
        "best": t.best,
        "early_stopping": t.early_stopping.state_dict(),
        "seed": t.cfg.seed,
        "world_size": t.info.world_size,
        "train_config": t.cfg.to_dict(),
        "model_config": config_to_dict(t.model_cfg),
        "model": t.raw_model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict(),
        "ema": t.ema.state_dict() if t.ema is not None else None,
        "rng": rng,
    }
    with atomic_open(t.run_dir / STATE_FILE) as f:  # a failing write (disk full) says why
        torch.save(state, f)


def restore_checkpoint(trainer: Any, state: dict[str, Any]) -> None:
    """Load a saved training state (:func:`load_state`) into ``trainer``."""
    t, world_size = trainer, trainer.info.world_size
    t.raw_model.load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    restore_schedule(t.scheduler, t.optimizer, state["scheduler"], keep_fitted=t.cfg.fit_schedule)
    t.scaler.load_state_dict(state["scaler"])
    if t.ema is not None:
        if state["ema"] is None:
            raise DecodetError("cannot resume with EMA on: the saved run trained without EMA", state["path"])
        t.ema.load_state_dict(state["ema"])
    t.epoch = int(state["epoch"])
    t.batches_done = int(state["batches_done"])
    t.global_step = int(state["global_step"])
    t.best = float(state["best"])
    t.early_stopping.load_state_dict(state.get("early_stopping"))
    rng = state.get("rng") or []
    if t.batches_done and len(rng) == world_size:
        t.resume_rng = rng[t.info.rank]
    elif t.batches_done:
        log.warning("resuming mid-epoch with another process count: augmentation randomness will differ")
    if t.batches_done and int(state.get("world_size", 1)) != world_size:
        log.warning("resuming mid-epoch with another process count: the epoch's remaining order differs")
    log.info("resumed from %s at epoch %d, step %d", state["path"], t.epoch + 1, t.global_step)
