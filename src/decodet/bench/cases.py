"""A benchmark row (:class:`Row`) and how to run it (:class:`Case`): shared by the timing loop
(``benchmark``) and the row builders (``rows``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

log = logging.getLogger(__name__)

Runner = Callable[[Tensor, Tensor], Any]


@dataclass
class Row:
    """One benchmark line; times in milliseconds; ``note`` says why a row has no numbers.
    ``peak_key`` names the precision whose matmul peak the row is judged against."""

    model: str
    runtime: str
    precision: str
    median_ms: float | None = None
    p90_ms: float | None = None
    images_per_s: float | None = None
    throughput: float | None = None  # images/s at the throughput batch
    gflops: float | None = None
    ratio: float | None = None
    peak_fraction: float | None = None
    peak_key: str = "fp32"
    ap: float | None = None
    ap_delta: float | None = None  # AP points (x100) against eager fp32
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Case:
    """A row and how to run it: ``runner(images, sizes)``; timed at ``x1`` (the latency batch)
    and ``x8`` (the throughput batch); ``runner`` also feeds the AP column."""

    row: Row
    runner: Runner | None = None
    times: list[float] = field(default_factory=list)
    times8: list[float] = field(default_factory=list)
    sync: Callable[[], None] | None = None


def fail(row: Row, exc: BaseException, prefix: str = "failed") -> Row:
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    row.note = f"{prefix}: {type(exc).__name__}: {first}"
    log.warning("%s %s %s: %s", row.model, row.runtime, row.precision, row.note)
    return row
