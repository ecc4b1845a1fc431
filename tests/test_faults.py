"""Distributed and crash faults, on real processes.

- two torchrun node agents (c10d rendezvous on 127.0.0.1) train to the weights of one process
  with the same global batch;
- a worker killed with SIGKILL under ``torchrun --max-restarts 1`` is restarted, resumes from the
  last checkpoint and ends with the weights of an uninterrupted run;
- a checkpoint write that fails (disk full, file too large) leaves the previous checkpoint
  byte-identical and stops ``decodet train`` with a one-line error naming the file and why;
- a data loader worker killed with SIGKILL stops training with a one-line error naming it.

Every process runs under a timeout; a test that times out kills its whole process group.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from decodet.engine.trainer import train
from test_distributed import _SCRIPT, PARITY_ATOL, train_for_parity
from test_trainer import TINY, make_tiny_coco, tiny_config

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
TIMEOUT = 240  # seconds for any one process tree; the tests take a few seconds each
EPOCH_LINE = re.compile(r"decodet\.engine\.trainer: epoch 1 \(step")  # rank 0 logs it just before the epoch's save


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def _start(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """A process in its own session (so a timeout can kill its whole tree)."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(cmd, cwd=cwd, env=env or _env(), text=True, start_new_session=True, **kwargs)


def _finish(proc: subprocess.Popen, what: str, timeout: float = TIMEOUT) -> tuple[str, str]:
    """Wait for ``proc``; on a timeout kill its process group and fail (a hang is a failure)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{what} did not finish within {timeout} s: {(err or '')[-3000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Pids of the direct children of ``pid`` (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _needs_proc() -> None:
    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        pytest.skip("needs Linux /proc/<pid>/task/<tid>/children to find worker processes")


# ----------------------------------------------------------------------------- multi-node


@pytest.mark.slow
def test_two_node_agents_equal_one_process_with_the_global_batch(tmp_path: Path) -> None:
    """``torchrun --nnodes 2 --nproc-per-node 1`` twice (two node agents, c10d rendezvous on
    127.0.0.1) x batch 2 reaches the weights of one process x batch 4 (frozen batch norms and
    deterministic transforms, as in test_distributed: see PARITY_ATOL there)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    data = make_tiny_coco(tmp_path / "data", n_train=8, n_val=2)
    common = {"epochs": 2, "eval_every": 0, "device": "cpu", "seed": 7}
    common["model_overrides"] = {**TINY, "query_layout": "score"}  # see test_distributed
    two = tiny_config(tmp_path, data, name="two", batch_size=2, **common).to_dict()
    one = tiny_config(tmp_path, data, name="one", batch_size=4, **common).to_dict()
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    results = tmp_path / "results"
    results.mkdir()

    rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "faults"]
    launch = _torchrun("--nnodes", "2", "--nproc-per-node", "1", *rdzv, "--local-addr", "127.0.0.1")
    args = [str(script), str(TESTS), json.dumps(two), str(tmp_path), str(results)]
    agents = [_start([*launch, *args], tmp_path) for _ in range(2)]
    outcomes = [_finish(agent, f"node agent {i}") for i, agent in enumerate(agents)]
    for agent, (_, err) in zip(agents, outcomes):
        assert agent.returncode == 0, err[-3000:]
    ranks = {rank: json.loads((results / f"{rank}.json").read_text()) for rank in (0, 1)}
    assert ranks[0]["final"] == ranks[1]["final"]  # the same all-reduced numbers on both nodes
    assert ranks[1]["writes"] == []  # only rank 0 (the first node) writes

    single = train_for_parity(one)
    assert single["step"] == ranks[0]["final"]["step"] == 4
    a = torch.load(tmp_path / "runs" / "two" / "last_state.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "runs" / "one" / "last_state.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    diffs = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()}
    assert max(diffs.values()) <= PARITY_ATOL, max(diffs, key=diffs.get)


# ----------------------------------------------------------------------------- elastic restart


def _train_args(data: Path, name: str, *extra: str) -> list[str]:
    sets = [f"--set={k}={v}" for k, v in TINY.items()]
    args = ["-m", "decodet", "train", "--model", "deco_tiny", "--data", str(data), "--imgsz", "64", *sets]
    args += ["--epochs", "3", "--batch-size", "2", "--workers", "0", "--threads", "1", "--device", "cpu"]
    return args + ["--eval-every", "0", "--seed", "0", "--project", "runs", "--name", name, *extra]


def _read_until(stream, pattern: re.Pattern, seen: threading.Event, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)
        if pattern.search(line):
            seen.set()


@pytest.mark.slow
def test_a_worker_killed_under_torchrun_restarts_and_resumes_from_the_last_checkpoint(tmp_path: Path) -> None:
    """Two workers, 3 epochs of 2 steps; rank 1 gets SIGKILL once epoch 1 is saved.  torchrun
    restarts both workers, which continue the run folder from its last checkpoint."""
    _needs_proc()
    data = make_tiny_coco(tmp_path / "data", n_train=8, n_val=2)
    launch = _torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.2")
    # torchrun's shared rendezvous store keeps the first attempt's process-group keys, and restarted
    # workers may read the dead ones' addresses (pytorch/pytorch#135712): a fresh store per attempt
    env = _env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    straight = _start([*launch, *_train_args(data, "straight")], tmp_path, env=env)
    elastic = _start([*launch, *_train_args(data, "elastic")], tmp_path, env=env, stdout=subprocess.DEVNULL)
    saved, lines = threading.Event(), []
    reader = threading.Thread(target=_read_until, args=(elastic.stderr, EPOCH_LINE, saved, lines), daemon=True)
    reader.start()
    try:
        assert saved.wait(TIMEOUT), "".join(lines)[-3000:]
        state = tmp_path / "runs" / "elastic" / "last_state.pt"  # renamed into place: complete once it exists
        deadline = time.monotonic() + TIMEOUT
        while not state.exists() and elastic.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        victims = [p for p in _children(elastic.pid) if _environ(p).get("RANK") == "1"]
        assert len(victims) == 1, victims
        assert _environ(victims[0])["TORCHELASTIC_RESTART_COUNT"] == "0"
        os.kill(victims[0], signal.SIGKILL)  # two epochs remain: the kill lands mid-run
        elastic.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail("the restarted run did not finish")
    finally:
        if elastic.poll() is None:
            os.killpg(elastic.pid, signal.SIGKILL)
        elastic.wait()
        reader.join()
    _, err = _finish(straight, "the uninterrupted run")
    assert straight.returncode == 0, err[-3000:]
    log = "".join(lines)
    assert elastic.returncode == 0, log[-3000:]
    assert "restarted by torchrun (restart 1): resuming" in log and "resumed from" in log, log[-3000:]

    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["elastic", "straight"]  # the restart reused its folder
    a, b = load_file(runs / "straight" / "last.safetensors"), load_file(runs / "elastic" / "last.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    from decodet.engine.metrics_log import read_metrics

    assert [r["step"] for r in read_metrics(runs / "elastic")] == [2, 4, 6]  # the lost epoch was replayed


def test_a_restarted_worker_finds_the_folder_of_its_job(tmp_path: Path, monkeypatch) -> None:
    from decodet.engine.faults import continue_elastic_run, mark_run

    runs = tmp_path / "runs"
    for name, job in (("x", "other-job"), ("x-2", "job"), ("x-3", None)):
        (runs / name).mkdir(parents=True)
        if job:
            monkeypatch.setenv("TORCHELASTIC_RUN_ID", job)
            mark_run(runs / name)
    cfg = tiny_config(tmp_path, tmp_path / "data", name="x")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert continue_elastic_run(cfg) == cfg  # the first attempt starts as usual
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    restarted = continue_elastic_run(cfg)  # no checkpoint yet: start afresh, in the job's folder
    assert (restarted.name, restarted.exist_ok, restarted.resume) == ("x-2", True, None)
    (runs / "x-2" / "last_state.pt").write_bytes(b"")
    assert continue_elastic_run(cfg).resume == str(runs / "x-2")
    assert continue_elastic_run(cfg.replace(resume="elsewhere")).resume == "elsewhere"  # an explicit --resume wins
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "a-new-job")
    assert continue_elastic_run(cfg) == cfg


# ----------------------------------------------------------------------------- disk full

# Runs `decodet train` with the checkpoint writes of one file failing: "enospc" makes the atomic
# writer's disk write raise ENOSPC after half the bytes (a disk filling up); "fsize" lowers the
# process's file size limit so the kernel itself fails the write (EFBIG).
_FAILING_WRITE = """
import errno, os, resource, signal, sys
how, target, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
if how == "enospc":
    from decodet.io import atomic
    real = atomic._write

    def full_disk(file, data):
        if os.path.basename(file.name).startswith("." + target + "."):
            file.write(bytes(data[: len(data) // 2]))
            file.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(file, data)

    atomic._write = full_disk
else:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from decodet.cli import main
sys.exit(main(sys.argv[4:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "how, target, reason",
    [("enospc", "last_state.pt", os.strerror(errno.ENOSPC)), ("fsize", "last.safetensors", os.strerror(errno.EFBIG))],
)
def test_a_failing_checkpoint_write_keeps_the_previous_checkpoint(
    tmp_path: Path, how: str, target: str, reason: str
) -> None:
    data = make_tiny_coco(tmp_path / "data", n_train=4, n_val=2)
    first = train(tiny_config(tmp_path, data, name="full", epochs=1))
    run = Path(first["run_dir"])
    checkpoints = {p.name: p.read_bytes() for p in run.iterdir() if p.suffix in (".pt", ".safetensors")}
    assert {"last.safetensors", "last_state.pt"} <= checkpoints.keys()
    limit = len(checkpoints["last.safetensors"]) // 2  # "fsize": under every checkpoint's size

    argv = ["train", "--resume", str(run), "--epochs", "2"]
    proc = _start([sys.executable, "-c", _FAILING_WRITE, how, target, str(limit), *argv], tmp_path)
    _, err = _finish(proc, "decodet train")
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    kept = "the previous version is left intact"
    assert line == f"decodet: error: {run / target}: cannot write the file ({reason}); {kept}"
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name in checkpoints}[target] == checkpoints[target]
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # the failed temp file is gone
    # the run continues from the kept checkpoint once the disk has room again
    again = train(tiny_config(tmp_path, data, name="full", epochs=2, resume=str(run)))
    assert again["step"] == 4


# ----------------------------------------------------------------------------- loader worker killed


@pytest.mark.slow
def test_a_killed_data_loader_worker_stops_training_with_one_line(tmp_path: Path) -> None:
    """SIGKILL to the DataLoader worker of `decodet train --workers 1`: exit 2 within the timeout,
    with one line naming the worker's pid (PyTorch notices the death through SIGCHLD)."""
    _needs_proc()
    data = make_tiny_coco(tmp_path / "data", n_train=240, n_val=2)  # 120 steps: the kill lands mid-epoch even late
    cmd = [sys.executable, *_train_args(data, "loader")]
    cmd[cmd.index("--workers") + 1] = "1"
    cmd[cmd.index("--epochs") + 1] = "1"
    proc = _start(cmd, tmp_path, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT
    workers: list[int] = []
    seen: dict[int, float] = {}  # candidate pid -> when first seen
    while not workers and proc.poll() is None and time.monotonic() < deadline:
        # The loader worker is forked: its command line is the trainer's.  So, for a moment, is a
        # child a library forks to exec a tool (ctypes.util.find_library runs ldconfig at import):
        # killing that one is silent, and under load the moment is long.  The worker is the child
        # whose command line is still the trainer's 0.3 s after it was first seen.
        now = time.monotonic()
        same = [c for c in _children(proc.pid) if _cmdline(c) == _cmdline(proc.pid)]
        seen = {c: seen.get(c, now) for c in same}
        workers = [c for c, first in seen.items() if now - first >= 0.3]
        if workers:
            try:
                os.kill(workers[0], signal.SIGKILL)
            except ProcessLookupError:  # gone between the listing and the kill: look again
                workers = []
        time.sleep(0.01)
    _, err = _finish(proc, "decodet train with a killed loader worker")
    assert workers, f"no loader worker appeared: {err[-3000:]}"
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"decodet: error: training stopped: data loader worker (pid {workers[0]}) "), line
    assert "killed by signal" in line or "exited unexpectedly" in line, line


class _Iter:
    """Stands for a multi-process DataLoader iterator: only its worker processes matter here."""

    def __init__(self, workers: list) -> None:
        self._workers = workers


def test_a_worker_killed_mid_transfer_is_named_though_the_error_is_an_eof(tmp_path: Path) -> None:
    """A worker SIGKILLed while the main process receives a batch from it surfaces as EOFError
    (multiprocessing's resource sharer): the dead process is found among the loader's workers and
    named in the same one line as PyTorch's own message; a live worker leaves the error as it was."""
    import multiprocessing as mp

    from decodet.engine.faults import loader_worker_error

    ctx = mp.get_context("fork" if sys.platform != "win32" else "spawn")
    alive, doomed = ctx.Process(target=time.sleep, args=(30,)), ctx.Process(target=time.sleep, args=(30,))
    alive.start(), doomed.start()
    try:
        assert loader_worker_error(EOFError(), tmp_path, _Iter([alive]), wait_s=0.2) is None
        assert loader_worker_error(ValueError("bad"), tmp_path, _Iter([alive])) is None
        assert loader_worker_error(EOFError(), tmp_path, None) is None  # workers=0: nothing to look for
        os.kill(doomed.pid, signal.SIGKILL)
        error = loader_worker_error(ConnectionResetError(), tmp_path, _Iter([alive, doomed]))
        assert error is not None
        message = str(error)
        assert f"data loader worker (pid {doomed.pid}) is killed by signal: Killed" in message, message
        assert "\n" not in message and "no checkpoint was written yet" in message
    finally:
        for p in (alive, doomed):
            p.kill()
            p.join(5)
