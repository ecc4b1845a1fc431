"""``amp="auto"``: bf16 and fp32 training steps timed alternately, so a transient load at the start
(a CPU hog, a ``pip install``) slows both alike and cannot flip the choice."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from decodet.engine import amp_probe
from decodet.engine.amp_probe import faster_of, fastest_amp, resolve_amp, time_alternating
from decodet.engine.train_config import TrainConfig
from decodet.engine.trainer import Trainer
from decodet.errors import DecodetError
from decodet.losses import build_criterion
from decodet.registry import build_from_config, get_config
from test_trainer import TINY, make_tiny_coco, tiny_config


class HoggedCPU:
    """A fake timer and step functions: bf16 steps take 0.43 s and fp32 steps 0.71 s (a 2-core Zen 4),
    while a hog runs during the probe's first ``hog_s`` seconds, slowing bf16 more than fp32
    (1.590 s vs 1.527 s measured under one)."""

    def __init__(self, hog_s: float) -> None:
        self.t, self.hog_s = 0.0, hog_s

    def timer(self) -> float:
        return self.t

    def step(self, amp: str):
        def run() -> None:
            hogged = self.t < self.hog_s
            self.t += {"bf16": 1.590 if hogged else 0.43, "none": 1.527 if hogged else 0.71}[amp]

        return run


@pytest.mark.parametrize("rounds", [3, 5])
def test_a_hog_during_the_first_half_of_the_probe_does_not_flip_the_choice(rounds: int) -> None:
    hogged_round = 1.590 + 1.527
    hog_s = hogged_round * (1 + rounds // 2) - 0.01  # the warm-up steps and the first half of the rounds
    cpu = HoggedCPU(hog_s)
    steps = {"bf16": cpu.step("bf16"), "none": cpu.step("none")}
    times = time_alternating(steps, rounds=rounds, min_rounds=rounds, timer=cpu.timer)
    assert len(times["bf16"]) == len(times["none"]) == rounds
    assert all(times["bf16"][r] > times["none"][r] for r in range(rounds // 2))  # hogged rounds favour fp32 ...
    assert faster_of(times) == "bf16"  # ... but the median round does not
    # the old probe (every bf16 step, then every fp32 step, the fastest of each) picked fp32 here
    cpu = HoggedCPU(hog_s)
    sequential = {amp: [] for amp in ("bf16", "none")}
    for amp in sequential:
        for _ in range(rounds + 1):
            t0 = cpu.t
            cpu.step(amp)()
            sequential[amp].append(cpu.t - t0)
    assert min(sequential["bf16"][1:]) > min(sequential["none"][1:])


def test_probe_stops_early_when_slow_and_picks_fp32_where_bf16_is_slower() -> None:
    clock = {"t": 0.0}

    def step(seconds: float):
        def run() -> None:
            clock["t"] += seconds

        return run

    times = time_alternating(
        {"bf16": step(3.0), "none": step(2.0)}, rounds=5, min_rounds=3, max_seconds=8.0, timer=lambda: clock["t"]
    )
    assert len(times["bf16"]) == 3  # 15 s after 3 rounds: no 4th
    assert faster_of(times) == "none"


def test_fastest_amp_leaves_the_model_as_it_was() -> None:
    torch.manual_seed(0)
    mcfg = get_config("deco_tiny", num_classes=2, **TINY)
    model = build_from_config(mcfg).eval()
    criterion = build_criterion(mcfg)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    images = torch.rand(2, 3, 64, 64)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])} for _ in range(2)]
    rng = torch.get_rng_state()
    amp, times = fastest_amp(model, criterion, images, targets, torch.device("cpu"))
    assert amp in ("bf16", "none") and len(times["bf16"]) >= 3
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_amp_auto_in_a_training_config(tmp_path: Path, caplog, monkeypatch, native_bf16) -> None:
    """Timed where the CPU has bf16 kernels; fp32 without a probe where bf16 would be emulated."""
    monkeypatch.setattr(amp_probe, "cpu_has_bf16", lambda: native_bf16)
    data = make_tiny_coco(tmp_path / "data")
    cfg = tiny_config(tmp_path, data, amp="auto")
    with caplog.at_level(logging.INFO, logger="decodet.engine.amp_probe"):
        trainer = Trainer(cfg)
    if native_bf16:
        assert trainer.cfg.amp in ("bf16", "none") and "amp auto: a training step takes" in caplog.text
    else:
        assert trainer.cfg.amp == "none" and "this CPU has no bf16 instructions" in caplog.text
    assert TrainConfig.load(trainer.run_dir / "train_config.yaml").amp == trainer.cfg.amp  # resume keeps it
    trainer.close()
    assert resolve_amp(TrainConfig(amp="bf16"), None, None, None, torch.device("cpu")).amp == "bf16"
    with pytest.raises(DecodetError, match="amp"):
        TrainConfig(amp="fp8").validate()
