"""Long runs: crash safety and flat host memory.

``decodet train`` killed with SIGKILL at random points (mid-epoch, mid-checkpoint write) never
leaves a corrupt checkpoint, and resuming until done ends with exactly the weights of an
uninterrupted run (CPU, one thread, workers 0, same seed).  A kill part-way through an epoch
loses that epoch's progress: the trainer saves at epoch ends, and ``--resume`` replays the epoch
from the saved state, whose data order and augmentation randomness are functions of (seed,
epoch), so the replay repeats the lost steps exactly.

Host memory stays flat from epoch to epoch (``benchmarks/bench_memory.py`` for bigger runs).
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from decodet.data.synthetic import generate_synthetic
from decodet.engine import trainer as trainer_mod
from decodet.engine.metrics_log import read_metrics
from decodet.engine.train_config import TrainConfig
from decodet.io.checkpoint import read_checkpoint
from test_trainer import make_tiny_coco, tiny_config

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
EPOCH_LINE = re.compile(r"decodet\.engine\.trainer: epoch \d+ \(step")  # logged just before the epoch's save


def _train_cmd(data: Path, project: Path, name: str, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "decodet", "train", "--model", "deco_tiny", "--data", str(data), "--imgsz", "96"]
    cmd += ["--epochs", str(EPOCHS), "--batch-size", "2", "--workers", "0", "--threads", "1", "--deterministic"]
    return cmd + ["--seed", "0", "--project", str(project), "--name", name, *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _writing(run: Path, name: str) -> bool:
    """Whether the temp file of an atomic write of ``name`` (``.<name>.<random>.tmp``) exists."""
    try:
        return any(e.name.startswith(f".{name}.") and e.name.endswith(".tmp") for e in os.scandir(run))
    except FileNotFoundError:
        return False


def _assert_consistent(run: Path) -> None:
    """Every checkpoint present is complete and loadable; the run's config and metrics read back."""
    for name in ("last.safetensors", "best.safetensors"):
        if (run / name).exists():
            cfg, state = read_checkpoint(run / name)
            assert cfg.name == "deco_tiny" and state
    if (run / "last_state.pt").exists():
        state = torch.load(run / "last_state.pt", map_location="cpu", weights_only=True)
        assert state["version"] == 1 and state["batches_done"] == 0  # saved at an epoch end
    if (run / "train_config.yaml").exists():
        assert TrainConfig.load(run / "train_config.yaml").epochs == EPOCHS
    if (run / "metrics.jsonl").exists():
        read_metrics(run)


def _watch_log(proc: subprocess.Popen, epoch_logged: threading.Event) -> None:
    """Drain the run's stderr; set ``epoch_logged`` at its first end-of-epoch log line."""
    for line in proc.stderr:
        if EPOCH_LINE.search(line.decode(errors="replace")):
            epoch_logged.set()


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    data = generate_synthetic(tmp_path / "data", train=8, val=4, image_size=96, seed=1)  # 4 steps per epoch
    runs = tmp_path / "runs"
    t0 = time.monotonic()
    subprocess.run(_train_cmd(data, runs, "straight"), check=True, capture_output=True, env=_env(), timeout=300)
    duration = time.monotonic() - t0
    epoch_time = min(r["epoch_time"] for r in read_metrics(runs / "straight"))

    run = runs / "killed"
    rng = random.Random(0)
    # What to wait for before the kill: the first two land inside a checkpoint write of a run that
    # has already saved a state (a kill there leaves a half-written temp file, or last.safetensors
    # one epoch ahead of last_state.pt); then part-way through an epoch (shortly after the previous
    # epoch's log line); then at a random moment (start-up, training, evaluation or a write).
    plan = ["write last_state.pt", "write last.safetensors", "mid-epoch", "random"]
    kills = []
    for how in plan:
        resume = (run / "last_state.pt").exists()
        extra = ("--resume", str(run)) if resume else ("--exist-ok",)  # nothing saved yet: start afresh
        proc = subprocess.Popen(
            _train_cmd(data, runs, "killed", *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env()
        )
        epoch_logged = threading.Event()
        reader = threading.Thread(target=_watch_log, args=(proc, epoch_logged), daemon=True)
        reader.start()
        try:
            if how.startswith("write"):
                name = how.split()[1]
                deadline = time.monotonic() + 120
                while proc.poll() is None and time.monotonic() < deadline:
                    if (run / "last_state.pt").exists() and _writing(run, name):
                        break
                    time.sleep(0.0005)
            elif how == "mid-epoch":
                epoch_logged.wait(timeout=120)
                time.sleep(rng.uniform(0.2, 0.6) * epoch_time)
            else:
                time.sleep(rng.uniform(0.2, 0.8) * duration)
        finally:
            finished = proc.poll() is not None
            _kill(proc)
            reader.join()
        if finished:  # the run ended before the kill: acceptable for the random one only
            assert proc.returncode == 0 and how == "random", (how, proc.returncode)
            break
        kills.append(how)
        _assert_consistent(run)
    assert kills[:3] == plan[:3]

    # resume to the end (a finished run resumes to an immediate exit)
    done = subprocess.run(
        _train_cmd(data, runs, "killed", "--resume", str(run)), capture_output=True, env=_env(), timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert torch.load(run / "last_state.pt", weights_only=True)["epoch"] == EPOCHS
    _assert_consistent(run)
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")], "temp files of killed writes remain"

    straight = load_file(runs / "straight" / "last.safetensors")
    resumed = load_file(run / "last.safetensors")
    assert straight.keys() == resumed.keys()
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == [4, 8, 12]  # one record per epoch: replayed epochs replace the lost ones


# ----------------------------------------------------------------------------- host memory


def _bench_memory():
    spec = importlib.util.spec_from_file_location("bench_memory", REPO / "benchmarks" / "bench_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_host_memory_stays_flat_across_epochs(tmp_path: Path, monkeypatch) -> None:
    """RSS after epoch 2 (allocator pools and evaluation buffers are in place by then) to epoch 8
    grows < 6 MiB; measured: ~1 MiB, and ~14 MiB when the loss of every step is kept (a leak of
    the autograd graph).  The loss / mAP plots are left out: matplotlib's text caches grow for
    the first ~60 plots, then stop (+45 MiB, bounded; bench_memory.py shows it)."""
    bench = _bench_memory()
    monkeypatch.setattr(trainer_mod, "plot_curves", lambda run_dir: [])
    data = make_tiny_coco(tmp_path / "data", n_train=8, n_val=2)
    rss = bench.measure(tiny_config(tmp_path, data, epochs=8, eval_every=1))
    assert len(rss) == 8
    assert rss[-1] - rss[1] < 6.0, bench.format_table(rss)
