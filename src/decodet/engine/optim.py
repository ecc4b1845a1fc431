"""AdamW parameter groups and per-step learning-rate schedules.

Groups follow the authors' releases: DECO trains the backbone and the encoder at their own (lower) rates,
everything else at ``lr``; DECO+ trains the backbone at a lower rate and puts no weight decay on norm layers and
biases.  Schedules are per-step :class:`~torch.optim.lr_scheduler.LambdaLR` with a picklable factor object, so
``state_dict()`` restores them exactly."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from decodet.errors import DecodetError

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORMS) or "norm" in type(module).__name__.lower()


def param_group_name(name: str, lr_encoder: float | None) -> str:
    """``"backbone"``, ``"encoder"`` (only when ``lr_encoder`` is set) or ``"rest"`` for a parameter name."""
    parts = name.split(".")
    if "backbone" in parts:
        return "backbone"
    if lr_encoder is not None and "encoder" in parts:
        return "encoder"
    return "rest"


def param_groups(
    model: nn.Module,
    lr: float,
    lr_backbone: float,
    weight_decay: float,
    lr_encoder: float | None = None,
    no_decay_norm_bias: bool = False,
) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters of ``model``.

    Args:
        lr: the rate of everything outside the backbone (and the encoder, see ``lr_encoder``).
        lr_encoder: the rate of parameters under an ``encoder`` module (DECO); ``None`` puts them with the rest.
        no_decay_norm_bias: no weight decay on norm-layer parameters and biases (DECO+).

    Returns non-empty groups with ``params``, ``lr``, ``weight_decay`` and a ``name`` (``backbone``,
    ``encoder``, ``rest``, with a ``_no_decay`` suffix for the undecayed part)."""
    model = getattr(model, "module", model)
    rates = {"backbone": lr_backbone, "encoder": lr_encoder, "rest": lr}
    groups: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        norm = _is_norm(module)
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{pname}" if module_name else pname
            kind = param_group_name(full, lr_encoder)
            decay = not (no_decay_norm_bias and (norm or pname == "bias"))
            key = kind if decay else f"{kind}_no_decay"
            group = groups.setdefault(
                key, {"name": key, "params": [], "lr": rates[kind], "weight_decay": weight_decay if decay else 0.0}
            )
            group["params"].append(p)
    if not groups:
        raise DecodetError("the model has no trainable parameters")
    order = ["backbone", "backbone_no_decay", "encoder", "encoder_no_decay", "rest", "rest_no_decay"]
    return [groups[k] for k in order if k in groups]


def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with a resolved :class:`~decodet.engine.train_config.TrainConfig`."""
    groups = param_groups(
        model,
        lr=cfg.lr,
        lr_backbone=cfg.lr_backbone,
        weight_decay=cfg.weight_decay,
        lr_encoder=cfg.lr_encoder,
        no_decay_norm_bias=not cfg.norm_bias_decay,
    )
    params = [p for g in groups for p in g["params"]]
    # the fused kernel (CPU and CUDA) is the fastest update; other devices take the default
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


class LRFactor:
    """The learning-rate multiplier at optimizer step ``step`` (0-based): warm-up, then a schedule.

    - ``constant``: 1.
    - ``step``: ``drop_factor ** (number of drop steps passed)`` (e.g. drop at epoch 100 x steps per epoch).
    - ``cosine``: from 1 at the end of warm-up to ``min_ratio`` at ``total_steps``.

    Warm-up multiplies by ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps.  A plain object
    (not a lambda) so ``LambdaLR.state_dict()`` saves its settings.

    A schedule sized to a time budget (:mod:`decodet.engine.budget`) is re-planned while it runs: :meth:`replan`
    maps the cosine's remaining progress onto a new number of remaining steps and :meth:`resize_warmup` the
    warm-up's remaining ramp onto a new length, each from an anchor (a step and the value reached there), so
    the rate never jumps.  ``max_total`` (the configured total) bounds every plan."""

    def __init__(
        self,
        schedule: str,
        total_steps: int,
        warmup_steps: int = 0,
        drop_steps: tuple[int, ...] = (),
        drop_factor: float = 0.1,
        min_ratio: float = 0.0,
    ) -> None:
        if schedule not in ("step", "cosine", "constant"):
            raise DecodetError(f"unknown lr schedule {schedule!r}; expected step, cosine or constant")
        self.schedule = schedule
        self.total_steps = max(1, int(total_steps))
        self.max_total = self.total_steps  # the configured total: an upper bound of any plan
        self.warmup_steps = max(0, int(warmup_steps))
        self.drop_steps = tuple(int(s) for s in drop_steps)
        self.drop_factor = float(drop_factor)
        self.min_ratio = float(min_ratio)
        self.fitted = False  # total_steps was fixed from measured step times (see fit_total_steps)
        # the cosine's anchor: progress ``anchor_progress`` at step ``anchor_step`` (None: 0 at the warm-up's end)
        self.anchor_step: int | None = None
        self.anchor_progress = 0.0
        # the warm-up's anchor: the factor ``warm_value`` at ``warm_from`` = step + 1 (0, 0: a plain ramp)
        self.warm_from = 0
        self.warm_value = 0.0
        # a plan sized to a time budget (decodet.engine.run_plan): the recipe's lr warm-up and the EMA
        # warm-up cap when the user left them unset (sized to the plan), else None; the budget's clock
        self.auto_warmup: int | None = None
        self.auto_ema_warmup: int | None = None
        self.auto_ema_decay = False  # the EMA decay too is sized to the plan
        self.spent_s = 0.0  # training seconds of the run at the last step (a resumed run continues the clock)

    def warm(self, step: int) -> float:
        """The warm-up multiplier at ``step`` (1 after the warm-up)."""
        x = step + 1
        if not self.warmup_steps or x >= self.warmup_steps:
            return 1.0
        return self.warm_value + (1.0 - self.warm_value) * (x - self.warm_from) / (self.warmup_steps - self.warm_from)

    def progress(self, step: int) -> float:
        """How far the cosine has gone at ``step``: 0 at the warm-up's end, 1 at ``total_steps``."""
        s0, q0 = (self.warmup_steps, 0.0) if self.anchor_step is None else (self.anchor_step, self.anchor_progress)
        if step >= self.total_steps > s0:
            return 1.0  # exactly the floor at the end (no rounding left over from the anchor)
        span = max(1, self.total_steps - s0)
        return min(1.0, max(0.0, q0 + (1.0 - q0) * (step - s0) / span))

    def __call__(self, step: int) -> float:
        warm = self.warm(step)
        if self.schedule == "constant":
            return warm
        if self.schedule == "step":
            return warm * self.drop_factor ** sum(step >= s for s in self.drop_steps)
        t = self.progress(step)
        return warm * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    def replan(self, step: int, total_steps: int) -> None:
        """End the schedule at ``total_steps`` (at most ``max_total``, at least ``step + 1``) instead, spreading
        the rest of the cosine from ``step`` over the new remaining steps."""
        total = max(step + 1, min(int(total_steps), self.max_total))
        if step > self.warmup_steps:  # the cosine has begun: anchor its progress here
            self.anchor_step, self.anchor_progress = step, self.progress(step)
        self.total_steps = total

    def resize_warmup(self, step: int, warmup_steps: int) -> None:
        """Re-aim a running warm-up to end at ``warmup_steps``, ramping from the value at ``step`` at most twice
        as steeply as a warm-up of that length would (so it may end later); no-op once it is (nearly) over."""
        x = step + 1
        if not self.warmup_steps or x >= self.warmup_steps - 1:
            return
        value = self.warm(step)
        end = max(int(warmup_steps), x + 1, x + round((1.0 - value) * max(1, int(warmup_steps)) / 2))
        if end != self.warmup_steps:
            self.warm_from, self.warm_value, self.warmup_steps = x, value, end


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    steps_per_epoch: int,
    epochs: int,
    warmup_steps: int = 0,
    drop_epoch: int | None = None,
    drop_factor: float = 0.1,
    min_ratio: float = 0.0,
    max_steps: int | None = None,
) -> LambdaLR:
    """A per-optimizer-step :class:`LambdaLR` (call ``scheduler.step()`` after each ``optimizer.step()``).

    ``steps_per_epoch`` counts optimizer steps (after gradient accumulation); ``drop_epoch`` ``None`` is 2/3 of
    ``epochs`` (100 of 150); ``max_steps`` caps the total steps the cosine decays over."""
    total = steps_per_epoch * epochs if max_steps is None else min(steps_per_epoch * epochs, max_steps)
    if drop_epoch is None:
        drop_epoch = max(1, round(epochs * 2 / 3))
    drop_steps = (drop_epoch * steps_per_epoch,)
    return LambdaLR(optimizer, LRFactor(schedule, total, warmup_steps, drop_steps, drop_factor, min_ratio))


def fit_total_steps(planned: int, steps_done: int, seconds_per_step: float, seconds_left: float) -> int:
    """The schedule's total steps that end within ``seconds_left`` at ``seconds_per_step``: never more than
    ``planned`` (a fast machine runs the configured schedule), never fewer than ``steps_done + 1``."""
    affordable = steps_done + int(seconds_left / max(seconds_per_step, 1e-9))
    return max(steps_done + 1, min(int(planned), affordable))
