"""What a process shows on the terminal: progress bars, the ``decodet`` logger, memory use.

Shared by training (``decodet.engine``), inference (``decodet.runtime``, ``decodet.predict``) and the CLI:

- :func:`progress`: a tqdm bar on rank 0 when stderr is a TTY, otherwise a log line every
  ``log_every`` steps (ETA included); other ranks show nothing.
- :func:`setup_logging`: concise lines on stderr that do not break a running bar.
- :func:`rss_mb`: this process's resident memory.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from decodet.errors import DecodetError

logger = logging.getLogger(__name__)


class Progress:
    """Iterate with a tqdm bar or a log line every ``log_every`` steps (module docstring).
    ``set_postfix(loss=..., lr=...)`` shows values next to the bar and in the log lines; the bar shows the ETA
    itself and log lines carry one. Other ranks show and log nothing."""

    def __init__(
        self,
        iterable: Iterable,
        total: int | None = None,
        desc: str = "",
        disable: bool | None = None,
        log_every: int = 50,
        log: logging.Logger | None = None,
    ) -> None:
        self._iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc = desc
        self.n = 0
        self.postfix: dict[str, str] = {}
        self._log = log or logger
        main = is_main_process()
        show = main and (_stderr_is_tty() if disable is None else not disable)
        self._bar = tqdm(iterable, total=self.total, desc=desc, dynamic_ncols=True) if show else None
        self._log_every = log_every if main and not show else 0
        self._start = time.monotonic()

    def __iter__(self) -> Iterator:
        self._start = time.monotonic()
        try:
            for item in self._bar if self._bar is not None else self._iterable:
                yield item
                self.n += 1
                if self._log_every and (self.n % self._log_every == 0 or self.n == self.total):
                    self._log_line()
        finally:
            self.close()

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("this progress has no total")
        return self.total

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_postfix(self, **values: Any) -> None:
        """Show ``values`` (floats with 4 significant digits) after the bar / in the log line."""
        self.postfix = {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in values.items()}
        if self._bar is not None:
            self._bar.set_postfix(self.postfix, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def _log_line(self) -> None:
        elapsed = time.monotonic() - self._start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        where = f"{self.n}/{self.total}" if self.total else str(self.n)
        parts = [f"{self.desc}: {where}" if self.desc else where]
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        parts.append(f"{rate:.2f} it/s")
        if self.total and rate > 0:
            parts.append(f"eta {_hms((self.total - self.n) / rate)}")
        self._log.info(" ".join(parts))


def progress(
    iterable: Iterable,
    total: int | None = None,
    desc: str = "",
    disable: bool | None = None,
    log_every: int = 50,
) -> Progress:
    """A ``Progress`` over ``iterable``; ``disable=None`` shows a bar only on rank 0 with a TTY stderr,
    ``True`` never shows one (rank 0 logs lines instead), ``False`` always shows one on rank 0.

    >>> bar = progress(loader, desc="epoch 3")
    >>> for images, targets in bar:
    ...     bar.set_postfix(loss=loss.item(), lr=lr)
    """
    return Progress(iterable, total=total, desc=desc, disable=disable, log_every=log_every)


class _TqdmHandler(logging.StreamHandler):
    """Writes log lines through ``tqdm.write`` so they do not break a running bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def rss_mb() -> float:
    """This process's resident set size in MiB (Linux ``/proc``; elsewhere the peak RSS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # POSIX only

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup_logging(level: int | str = "INFO", log_file: str | os.PathLike | None = None) -> logging.Logger:
    """Configure the ``decodet`` logger: concise lines on stderr (and ``log_file`` if given). Idempotent
    (replaces the handlers it installed before). Processes other than rank 0 log warnings and errors only."""
    log = logging.getLogger("decodet")
    for handler in [h for h in log.handlers if getattr(h, "_decodet", False)]:
        log.removeHandler(handler)
        handler.close()
    try:
        log.setLevel(level.upper() if isinstance(level, str) else level)
    except (ValueError, TypeError):
        raise DecodetError(f"unknown log level {level!r} (use DEBUG, INFO, WARNING or ERROR)") from None
    if not is_main_process():
        log.setLevel(max(log.level, logging.WARNING))
    handlers: list[logging.Handler] = [_TqdmHandler(sys.stderr)]
    handlers[0].setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S"))
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(file_handler)
    for handler in handlers:
        handler._decodet = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.propagate = False
    return log


def is_main_process() -> bool:
    dist = sys.modules.get("torch.distributed")  # never imported -> no process group exists
    return dist is None or not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
