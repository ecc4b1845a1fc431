"""Exponential moving average of a model's weights (RT-DETR / DECO+ style).

After each optimizer step every floating-point tensor of the state dict (parameters *and*
buffers such as BN running statistics) moves towards the live model's::

    d = decay * (1 - exp(-updates / warmup))       # small at first, -> decay
    ema = d * ema + (1 - d) * live

Integer buffers (``num_batches_tracked``) are copied.  The EMA copy is what evaluation and
the saved ``last`` / ``best`` weights use.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn


class ModelEMA:
    """An EMA copy of ``model`` (fp32, eval mode, no gradients).

    Args:
        model: the live model (a DDP wrapper is unwrapped).
        decay: the asymptotic decay.
        warmup: updates over which the decay ramps up; ``0`` uses ``decay`` from the start.  A
            plain attribute: a run planned to a time budget re-sizes it as the plan changes
            (:mod:`decodet.engine.run_plan`); the weights do not jump, only later updates' decay.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: int = 2000) -> None:
        self.module = copy.deepcopy(_unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.warmup = int(warmup)
        self.updates = 0
        self._pairs: tuple[int, list[Tensor], list[Tensor], list[Tensor], list[Tensor]] | None = None

    def current_decay(self, updates: int | None = None) -> float:
        """The decay used at update number ``updates`` (default: the last one)."""
        n = self.updates if updates is None else updates
        return self.decay if self.warmup <= 0 else self.decay * (1.0 - math.exp(-n / self.warmup))

    def _tensors(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """(ema floats, live floats, ema others, live others), cached per live model."""
        if self._pairs is None or self._pairs[0] != id(model):
            live = model.state_dict(keep_vars=True)
            ema = self.module.state_dict(keep_vars=True)
            floats = [k for k, v in ema.items() if v.dtype.is_floating_point]
            others = [k for k, v in ema.items() if not v.dtype.is_floating_point]
            tensors = [[sd[k].data for k in keys] for keys in (floats, others) for sd in (ema, live)]
            self._pairs = (id(model), *tensors)
        return self._pairs[1:]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the EMA one step towards ``model``'s current weights."""
        self.updates += 1
        d = self.current_decay()
        ema_f, live_f, ema_o, live_o = self._tensors(_unwrap(model))
        if ema_f:
            torch._foreach_lerp_(ema_f, [t.to(e.dtype) for t, e in zip(live_f, ema_f)], 1.0 - d)
        for e, t in zip(ema_o, live_o):
            e.copy_(t)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay, "warmup": self.warmup}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
        self.decay = float(state.get("decay", self.decay))
        self.warmup = int(state.get("warmup", self.warmup))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
