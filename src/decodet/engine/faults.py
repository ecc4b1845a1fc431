"""Process faults during training: a worker restarted by torchrun, a data loader worker that dies.

**Elastic restarts.** ``torchrun --max-restarts N`` starts every worker again when one fails,
with ``TORCHELASTIC_RESTART_COUNT`` > 0 and the same ``TORCHELASTIC_RUN_ID``.  The first
attempt's rank 0 marks its run folder with that id (:func:`mark_run`); a restarted worker finds
the folder again (:func:`continue_elastic_run`) and resumes from its last checkpoint, so a
restart loses at most the epoch in progress and ends with the weights of an uninterrupted run.

**Dead loader workers.** PyTorch's ``DataLoader`` notices a worker process that died (killed by
the out-of-memory killer, a signal) and raises a ``RuntimeError`` naming its pid;
:func:`loader_worker_error` turns it into a one-line :class:`DecodetError` that also says where
the last checkpoint is.  A worker killed while the main process is receiving a batch from it
shows up instead as an ``EOFError`` or ``ConnectionError`` (the tensor is shared through a file
descriptor the dead worker was to hand over); then the loader's worker processes are polled for a
moment, and the one that died is named the same way.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from decodet.engine.checkpointing import STATE_FILE
from decodet.errors import DecodetError
from decodet.io.atomic import atomic_write_text

if TYPE_CHECKING:
    from decodet.engine.train_config import TrainConfig

log = logging.getLogger(__name__)

RUN_ID_FILE = ".torchelastic_run_id"
# PyTorch's messages: "DataLoader worker (pid 123) is killed by signal: Killed." (its SIGCHLD
# handler) and "DataLoader worker (pid(s) 123) exited unexpectedly" (a dead worker found while waiting)
_WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (.*)")


def restart_count() -> int:
    """How many times torchrun has restarted this job's workers (0: the first attempt, or no torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _job_id() -> str | None:
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


def mark_run(run_dir: Path) -> None:
    """Record the torchrun job in a fresh run folder (rank 0), so a restarted worker finds it."""
    job = _job_id()
    if job is not None:
        atomic_write_text(run_dir / RUN_ID_FILE, job)


def _marked_run(project: str, name: str) -> Path | None:
    """The newest of ``project/name``, ``project/name-2``, ... marked with this torchrun job's id."""
    job, base = _job_id(), Path(project) / name
    found = None
    for n in range(1, 10_000):
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        if not folder.is_dir():
            break
        marker = folder / RUN_ID_FILE
        if marker.is_file() and marker.read_text(encoding="utf-8").strip() == job:
            found = folder
    return found


def continue_elastic_run(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` unchanged, except in a worker restarted by torchrun: then the config that continues
    the run folder of the job's first attempt (resuming from its last checkpoint, if it wrote one)."""
    if cfg.resume or restart_count() == 0 or _job_id() is None:
        return cfg
    folder = _marked_run(cfg.project, str(cfg.name or cfg.model))
    if folder is None:
        return cfg
    resume = (folder / STATE_FILE).is_file()
    if os.environ.get("RANK", "0") == "0":
        how = "resuming %s from its last checkpoint" if resume else "no checkpoint yet: starting %s afresh"
        log.warning("restarted by torchrun (restart %d): " + how, restart_count(), folder)
    return cfg.replace(resume=str(folder)) if resume else cfg.replace(name=folder.name, exist_ok=True)


def loader_worker_error(
    exc: BaseException, run_dir: Path | None, loader_iter: Any = None, wait_s: float = 5.0
) -> DecodetError | None:
    """A one-line error for a data loader worker that died (``None`` if ``exc`` is another error).

    ``exc`` is PyTorch's ``RuntimeError`` naming the worker, or an ``EOFError``/``ConnectionError``
    raised while a batch was received; for those, ``loader_iter`` (the epoch's DataLoader iterator)
    is searched for a worker process that has exited, for up to ``wait_s`` seconds."""
    match = _WORKER_DIED.search(str(exc)) if isinstance(exc, RuntimeError) else None
    if match is not None:
        pids, how = match.group(1).strip(), match.group(2).strip().rstrip(". ")
    elif isinstance(exc, (EOFError, ConnectionError)) and loader_iter is not None:
        try:
            dead = _dead_worker(loader_iter, wait_s)
        except RuntimeError as late:  # PyTorch's SIGCHLD handler fired while we waited: its message names it
            return loader_worker_error(late, run_dir)
        if dead is None:
            return None
        pids, how = dead
    else:
        return None
    kept = "no checkpoint was written yet"
    if run_dir is not None and (run_dir / STATE_FILE).is_file():
        kept = f"the last checkpoint is kept: continue with --resume {run_dir}"
    return DecodetError(
        f"training stopped: data loader worker (pid {pids}) {how} — often the out-of-memory killer: "
        f"try fewer --workers or a smaller --batch-size; {kept}"
    )


def _dead_worker(loader_iter: Any, wait_s: float) -> tuple[str, str] | None:
    """``(pid, how it ended)`` of a worker of ``loader_iter`` that has exited, polled for ``wait_s``
    seconds (a SIGKILLed process can take a moment to become reapable); ``None`` if all stay alive.
    ``_workers`` is the iterator's private list of ``multiprocessing.Process``: a single-process
    iterator, or a PyTorch without it, has none, and the original error stands."""
    workers = list(getattr(loader_iter, "_workers", None) or [])
    deadline = time.monotonic() + wait_s
    while workers:
        for worker in workers:
            code = worker.exitcode  # polls (reaps) without blocking
            if code is not None:
                if code < 0:
                    name = signal.strsignal(-code) or f"signal {-code}"
                    return str(worker.pid), f"is killed by signal: {name}"
                return str(worker.pid), f"exited unexpectedly with exit code {code}"
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)
    return None
