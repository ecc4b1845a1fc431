"""``amp="auto"``: train in bf16 autocast where it is faster than fp32 on this machine.

On a CPU, bf16 autocast is about twice as fast as fp32 with AMX or a fast AVX-512-BF16 unit and
slower on others (0.53 vs 0.42 s per step on one AVX-512-BF16 Xeon), so where the CPU has bf16
kernels at all a few training steps of each are timed (a few seconds) instead of guessing from
its flags; where it has none (AVX2 only), bf16 is emulated and fp32 is taken without a probe.  The two precisions
alternate step by step (bf16, fp32, bf16, fp32, ...) and the choice is the median of the
rounds' bf16/fp32 ratios: a transient load (a ``pip install``, a CPU hog at the start) slows
both precisions of a round alike and cannot decide the choice (timed one after the other, it
once did: docs/benchmarks.md).  On CUDA, bf16 is taken where supported.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from decodet.data.transforms import collate
from decodet.engine.seeding import get_rng_state, set_rng_state
from decodet.engine.train_config import TrainConfig
from decodet.evaluation.evaluate import autocast
from decodet.utils import distributed as D

log = logging.getLogger(__name__)

ROUNDS, MIN_ROUNDS, MAX_SECONDS = 5, 3, 8.0  # alternating rounds; after MIN_ROUNDS, stop once MAX_SECONDS are spent


def time_alternating(
    steps: Mapping[str, Callable[[], None]],
    rounds: int = ROUNDS,
    min_rounds: int = MIN_ROUNDS,
    max_seconds: float = MAX_SECONDS,
    timer: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each of ``steps``: one untimed warm-up call each, then ``rounds`` rounds
    in which each is called once, in turn (fewer rounds, but at least ``min_rounds``, once the
    timed rounds have taken ``max_seconds``)."""
    for fn in steps.values():
        fn()  # kernels, allocations, caches
    times: dict[str, list[float]] = {name: [] for name in steps}
    begin = timer()
    for r in range(rounds):
        if r >= min_rounds and timer() - begin > max_seconds:
            break
        for name, fn in steps.items():
            t0 = timer()
            fn()
            times[name].append(timer() - t0)
    return times


def faster_of(times: Mapping[str, list[float]], first: str = "bf16", second: str = "none") -> str:
    """``first`` when the median of the rounds' ``first`` / ``second`` time ratios is below 1, else
    ``second`` (round ``i`` of each ran back to back, under the same load)."""
    ratios = [a / max(b, 1e-12) for a, b in zip(times[first], times[second])]
    return first if statistics.median(ratios) < 1.0 else second


def fastest_amp(
    model: nn.Module,
    criterion: nn.Module,
    images: Tensor,
    targets: list[dict[str, Any]],
    device: torch.device,
    timer: Callable[[], float] = time.perf_counter,
) -> tuple[str, dict[str, list[float]]]:
    """``("bf16" | "none", seconds per step of each)``: the autocast that trains ``model`` faster
    on ``device``'s CPU, timed with forward and backward passes of ``images`` / ``targets``.

    The model's buffers (BN statistics), gradients, mode and the global RNG states are left as
    they were."""
    buffers = dict(model.named_buffers())
    saved = {k: v.clone() for k, v in model.state_dict().items() if k in buffers}
    rng, was_training = get_rng_state(), model.training
    model.train()

    def step(amp: str) -> Callable[[], None]:
        def run() -> None:
            with autocast(device, amp):
                outputs = model(images)
            criterion(outputs, targets)["loss"].backward()
            model.zero_grad(set_to_none=True)

        return run

    try:
        times = time_alternating({"bf16": step("bf16"), "none": step("none")}, timer=timer)
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved, strict=False)
        model.train(was_training)
        set_rng_state(rng)
    return faster_of(times), times


def cpu_has_bf16() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX-512 BF16 / AMX; AVX-512 cores emulate
    them).  Without, bf16 autocast runs ATen's emulation, several times slower than fp32 (on a
    2-core AVX2 EPYC a 2,048 bf16 matrix product took 60x the fp32 one), so no probe is needed."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_amp(
    cfg: TrainConfig, model: nn.Module, criterion: nn.Module, dataset: Dataset, device: torch.device
) -> TrainConfig:
    """``cfg`` with ``amp="auto"`` replaced by the precision to train in (module docstring; on a
    CPU with bf16 kernels every process times a batch of the training data, rank 0's choice is
    taken); one log line gives the choice and the times measured."""
    if cfg.amp != "auto":
        return cfg
    if device.type == "cuda":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "none"
        why = "bf16 supported" if amp == "bf16" else "no bf16 on this GPU"
    elif device.type == "cpu" and not cpu_has_bf16():
        amp, why = "none", "this CPU has no bf16 instructions (AVX-512 BF16 or AMX): bf16 would be emulated, slower"
    elif device.type == "cpu":
        rng = get_rng_state()  # the dataset's augmentation draws from the global RNGs
        try:
            images, targets = collate([dataset[i] for i in range(min(len(dataset), cfg.batch_size))])
        finally:
            set_rng_state(rng)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = [{"labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        amp, times = fastest_amp(model, criterion, images, targets, device)
        b, f, n = statistics.median(times["bf16"]), statistics.median(times["none"]), len(times["bf16"])
        why = f"a training step takes {b:.3f} s in bf16, {f:.3f} s in fp32 (medians of {n} alternating rounds)"
    else:
        amp, why = "none", f"no autocast choice on {device.type}"
    amp = D.broadcast_object(amp)
    if D.is_main():
        log.info("amp auto: %s: training in %s", why, "bf16" if amp == "bf16" else "fp32")
    return dataclasses.replace(cfg, amp=amp)
