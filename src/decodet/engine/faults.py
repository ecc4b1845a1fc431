"""Process faults during training: a worker restarted by torchrun, a data loader worker that dies.

**Elastic restarts.** ``torchrun --max-restarts N`` starts every worker again when one fails,
with ``TORCHELASTIC_RESTART_COUNT`` > 0 and the same ``TORCHELASTIC_RUN_ID``.  The first
attempt's rank 0 marks its run folder with that id (:func:`mark_run`); a restarted worker finds
the folder again (:func:`continue_elastic_run`) and resumes from its last checkpoint, so a
restart loses at most the epoch in progress and ends with the weights of an uninterrupted run.

**Dead loader workers.** PyTorch's ``DataLoader`` notices a worker process that died (killed by
the out-of-memory killer, a signal) and raises a ``RuntimeError`` naming its pid;
:func:`loader_worker_error` turns it into a one-line :class:`DecodetError` that also says where
the last checkpoint is.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

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


def loader_worker_error(exc: BaseException, run_dir: Path | None) -> DecodetError | None:
    """A one-line error for a data loader worker that died (``None`` if ``exc`` is another error)."""
    match = _WORKER_DIED.search(str(exc))
    if match is None:
        return None
    pids, how = match.group(1).strip(), match.group(2).strip().rstrip(". ")
    kept = "no checkpoint was written yet"
    if run_dir is not None and (run_dir / STATE_FILE).is_file():
        kept = f"the last checkpoint is kept: continue with --resume {run_dir}"
    return DecodetError(
        f"training stopped: data loader worker (pid {pids}) {how} — often the out-of-memory killer: "
        f"try fewer --workers or a smaller --batch-size; {kept}"
    )
