"""What machine a benchmark ran on: CPU model and flags, threads, library versions, and the matrix-multiply
peaks each precision is judged against.

Peaks are the best GFLOP/s of one ``n x n`` matrix product per precision, timed by the caller in turns with
the rows it compares (so they see the same machine load):

  * ``fp32``: ``torch.mm`` on float32 (MKL / oneDNN sgemm);
  * ``bf16``: ``torch.mm`` on bfloat16 (oneDNN; AVX512-BF16 / AMX where the CPU has them);
  * ``int8``: ``torch._int_mm`` (int8 x int8 -> int32, oneDNN; VNNI / AMX-INT8 where present).
A multiply-add counts as 2 FLOPs (int8 "FLOPs" are integer operations, counted alike).
"""

from __future__ import annotations

import importlib.metadata
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")
LIBRARIES = ("torch", "onnxruntime", "openvino", "torchao", "nncf")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (``None`` where there is none, e.g. macOS)."""
    for line in _cpuinfo().splitlines():
        if line.startswith(("model name", "Model", "Hardware")):
            return line.partition(":")[2].strip() or None
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it does not exist)."""
    line = next((ln for ln in _cpuinfo().splitlines() if ln.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def cpu_has_vnni() -> bool:
    """Whether the CPU has AVX512-VNNI, AVX-VNNI or AMX-INT8 (u8 x s8 dot products)."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries the rows use (absent ones left out)."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def machine_info(threads: int) -> dict[str, object]:
    """The benchmark header: CPU model, relevant flags, threads, logical CPUs, versions."""
    flags = cpu_flags()
    return {
        "cpu": cpu_model() or "unknown (no /proc/cpuinfo)",
        "flags": [f for f in FLAGS_OF_INTEREST if f in flags],
        "threads": int(threads),
        "logical_cpus": os.cpu_count(),
        "versions": library_versions(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def format_header(info: dict[str, object]) -> str:
    versions = info.get("versions") or {}
    flags = info.get("flags") or []
    lines = [
        f"- CPU: {info.get('cpu')} ({info.get('logical_cpus')} logical CPUs), threads used: {info.get('threads')}",
        f"- CPU flags: {', '.join(flags) if flags else 'none of ' + ', '.join(FLAGS_OF_INTEREST)}",
        "- libraries: " + ", ".join(f"{k} {v}" for k, v in versions.items()),  # type: ignore[union-attr]
        f"- GPU: {info.get('cuda') or 'none (GPU rows skipped)'}",
    ]
    return "\n".join(lines)


def peak_calls(n: int = 2048, target_s: float = 0.25) -> dict[str, tuple[Callable[[], object], float]]:
    """``{precision: (call, GFLOPs of one call)}`` for the matmul peaks (module docstring); a precision whose
    kernel does not run here is left out. Each precision's matrix side doubles from 256 up to ``n`` while one
    product stays within ``target_s``: where a precision has no native kernel (bf16 and int8 on an AVX2-only
    CPU run about 60x slower than fp32: 15 s for one 2048 bf16 product on one thread) its peak is timed on a
    smaller product instead of stalling the benchmark for minutes."""
    g = torch.Generator().manual_seed(0)
    makers: dict[str, Callable[[int], Callable[[], object]]] = {
        "fp32": lambda m: _product(torch.mm, torch.randn(m, m, generator=g)),
        "bf16": lambda m: _product(torch.mm, torch.randn(m, m, generator=g).bfloat16()),
        "int8": lambda m: _product(torch._int_mm, torch.randint(-127, 128, (m, m), dtype=torch.int8, generator=g)),
    }
    out = {}
    for name, make in makers.items():
        m = min(256, n)
        try:
            call = make(m)
            seconds = _timed(call)
            while 2 * m <= n and 8 * seconds <= target_s:  # a product of twice the side costs 8x
                m *= 2
                call = make(m)
                seconds = _timed(call)
        except (RuntimeError, NotImplementedError):
            continue
        out[name] = (call, 2 * m**3 / 1e9)
    return out


def _product(op: Callable[..., object], a: torch.Tensor) -> Callable[[], object]:
    b = a.flip(0).contiguous()
    return lambda: op(a, b)


def _timed(call: Callable[[], object]) -> float:
    """Seconds of one call after a first (warm-up) call."""
    call()
    start = time.perf_counter()
    call()
    return time.perf_counter() - start
