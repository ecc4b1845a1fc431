"""Side-by-side inference latency: one table, every row measured in the same run.

Rows for one DECO model (random weights are fine for speed): torch eager fp32, torch bf16
autocast, ``torch.compile``, ONNX Runtime fp32 and int8 — each timed on the model *with*
its post-processing (``DeployModel``, what the ONNX file holds) — and, for comparison,
Hugging Face ``DetrForObjectDetection`` (ResNet-50) and ``RTDetrForObjectDetection``
(ResNet-18) built from their configs with random weights (model forward only; their
post-processing is a separate call).

Conventions:
  * latency: median and 90th percentile of ``iters`` timed calls after ``warmup`` calls;
    images/s = batch / median.  Rows are timed in turns (iteration i runs every row once),
    so load from other processes on a shared machine falls on all rows alike.
  * GFLOPs: ``torch.utils.flop_counter.FlopCounterMode`` on one eager fp32 forward, a
    multiply-add counted as 2 FLOPs; it counts convolutions and matrix products only
    (elementwise ops, norms and pooling are not counted).  The same (fp32-equivalent) count
    is used for every row of a model, whatever its precision.
  * peak: the best GFLOP/s of a 2048x2048 fp32 matmul timed with torch at the same thread
    count, in turns with the rows; "% peak" = (GFLOPs / median latency) / peak.
  * ratio: the DECO torch-eager fp32 median divided by the row's (> 1 is faster).
  * int8 rows may pass 100% of the *fp32* peak: int8 kernels (VNNI/AMX) do more per cycle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from decodet.deploy.export import export_onnx
from decodet.deploy.runtime import DeployModel, as_size, prepare_model
from decodet.registry import build_model, deploy_num_top, list_models

log = logging.getLogger(__name__)


@dataclass
class Row:
    """One benchmark line; times in milliseconds; ``note`` says why a row has no numbers."""

    model: str
    runtime: str
    precision: str
    median_ms: float | None = None
    p90_ms: float | None = None
    images_per_s: float | None = None
    gflops: float | None = None
    ratio: float | None = None
    peak_fraction: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads, restoring the previous count after."""
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def count_gflops(model: nn.Module, *inputs: Any, **kwargs: Any) -> float:
    """GFLOPs of one forward (multiply-add = 2 FLOPs; convolutions and matmuls only)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*inputs, **kwargs)
    return counter.get_total_flops() / 1e9


@dataclass
class _Case:
    row: Row
    fn: Callable[[], Any] | None = None
    times: list[float] = field(default_factory=list)


def _fail(row: Row, exc: BaseException) -> Row:
    first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
    row.note = f"failed: {type(exc).__name__}: {first}"
    log.warning("%s %s %s: %s", row.model, row.runtime, row.precision, row.note)
    return row


def _measure(cases: list[_Case], batch: int, warmup: int, iters: int, threads: int) -> None:
    """Warm every case up, then time them round-robin: iteration i runs each case once, so
    load from other processes on a shared machine hits all rows alike."""
    with torch_threads(threads), torch.no_grad():
        for case in cases:
            if case.fn is None:
                continue
            try:
                start = time.perf_counter()
                case.fn()  # first call: compilation / session warm-up, not timed
                case.row.extra["first_call_s"] = time.perf_counter() - start
                for _ in range(warmup):
                    case.fn()
            except Exception as exc:  # a failing row must not sink the table
                _fail(case.row, exc)
                case.fn = None
        live = [c for c in cases if c.fn is not None]
        for _ in range(max(1, iters)):
            for case in live:
                start = time.perf_counter()
                case.fn()
                case.times.append(time.perf_counter() - start)
    for case in live:
        med = statistics.median(case.times)
        row = case.row
        row.median_ms, row.p90_ms = med * 1e3, _percentile(case.times, 0.9) * 1e3
        row.images_per_s = batch / med
        if row.runtime == "torch.compile":
            row.note = f"compiling took {row.extra['first_call_s']:.0f} s (not timed)"


def run_benchmark(
    model_name: str = "deco_r50",
    imgsz: int | tuple[int, int] = 640,
    batch: int = 1,
    threads: int = 2,
    warmup: int = 3,
    iters: int = 10,
    include_hf: bool = True,
    include_compile: bool = True,
    include_onnx: bool = True,
    weights: str | None = None,
    num_classes: int = 80,
) -> list[Row]:
    """Benchmark one model every way (module docstring); returns the rows, the first being
    the matmul peak, the second DECO torch eager fp32 (the ratio baseline).

    All rows are prepared first (models built, exported, compiled), then timed in turns.
    ``weights``: a checkpoint to load instead of the preset's random initialisation.
    """
    torch.manual_seed(0)
    source = weights if weights is not None else build_model(model_name, num_classes=num_classes)
    model = prepare_model(source)
    name = model.config.name
    size = as_size(imgsz, model.config)
    deploy = DeployModel(model, deploy_num_top(model.config)).eval()
    x = torch.randn(batch, 3, *size)
    sizes = torch.tensor([[float(size[0]), float(size[1])]] * batch)
    gflops = count_gflops(model, x)

    def bf16() -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return deploy(x, sizes)

    cases = [
        _Case(Row(name, "torch eager", "fp32", gflops=gflops), lambda: deploy(x, sizes)),
        _Case(Row(name, "torch eager", "bf16 autocast", gflops=gflops), bf16),
    ]
    if include_compile:
        compiled: Any = None

        def compiled_call() -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = torch.compile(deploy)
            return compiled(x, sizes)

        cases.append(_Case(Row(name, "torch.compile", "fp32", gflops=gflops), compiled_call))
    with tempfile.TemporaryDirectory(prefix="decodet-bench-") as tmp:
        if include_onnx:
            cases += _onnx_cases(model, name, size, batch, threads, gflops, x, sizes, Path(tmp))
        if include_hf:
            cases += _hf_cases(size, batch, num_classes)
        return _with_peak(cases, batch, warmup, iters, threads)


def _onnx_cases(
    model: nn.Module,
    name: str,
    size: tuple[int, int],
    batch: int,
    threads: int,
    gflops: float,
    x: torch.Tensor,
    sizes: torch.Tensor,
    tmp: Path,
) -> list[_Case]:
    from decodet.deploy.ort import OrtModel

    cases = []
    feeds = {"images": x.numpy(), "orig_sizes": sizes.numpy()}
    for precision in ("fp32", "int8"):
        row = Row(name, "onnxruntime", precision, gflops=gflops)
        try:
            start = time.perf_counter()
            path = export_onnx(
                model, tmp / f"{precision}.onnx", imgsz=size, precision=precision, batch=batch, calib_count=4
            )
            row.extra["export_s"] = time.perf_counter() - start
            session = OrtModel(path, threads=threads)
        except Exception as exc:
            cases.append(_Case(_fail(row, exc)))
            continue
        cases.append(_Case(row, lambda s=session: s(feeds)))
    return cases


def _hf_models(num_classes: int) -> list[tuple[str, Callable[[], nn.Module]]]:
    from transformers import (
        DetrConfig,
        DetrForObjectDetection,
        ResNetConfig,
        RTDetrConfig,
        RTDetrForObjectDetection,
        RTDetrResNetConfig,
    )

    def detr_r50() -> nn.Module:
        backbone = ResNetConfig(out_features=["stage4"])  # ResNet-50 layout (depths 3-4-6-3, bottleneck)
        cfg = DetrConfig(
            use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone, num_labels=num_classes
        )
        return DetrForObjectDetection(cfg)

    def rtdetr_r18() -> nn.Module:
        backbone = RTDetrResNetConfig(
            depths=[2, 2, 2, 2],
            hidden_sizes=[64, 128, 256, 512],
            layer_type="basic",
            out_features=["stage2", "stage3", "stage4"],
            downsample_in_bottleneck=False,
        )
        cfg = RTDetrConfig(
            use_pretrained_backbone=False,
            backbone_config=backbone,
            encoder_in_channels=[128, 256, 512],
            hidden_expansion=0.5,
            decoder_layers=3,
            num_labels=num_classes,
        )
        return RTDetrForObjectDetection(cfg)

    return [("HF DETR-R50", detr_r50), ("HF RT-DETR-R18", rtdetr_r18)]


def _hf_cases(size: tuple[int, int], batch: int, num_classes: int) -> list[_Case]:
    labels = ("HF DETR-R50", "HF RT-DETR-R18")
    try:
        builders = _hf_models(num_classes)
    except ImportError:
        note = "skipped: transformers is not installed (pip install 'decodet[bench]')"
        return [_Case(Row(label, "torch eager", "fp32", note=note)) for label in labels]
    cases = []
    x = torch.randn(batch, 3, *size)
    for label, build in builders:
        row = Row(label, "torch eager", "fp32")
        try:
            torch.manual_seed(0)
            hf = build().eval()
            row.gflops = count_gflops(hf, pixel_values=x)
        except Exception as exc:
            cases.append(_Case(_fail(row, exc)))
            continue
        cases.append(_Case(row, lambda m=hf: m(pixel_values=x)))
    return cases


def _finish(rows: list[Row], peak: float) -> None:
    base = next((r for r in rows if r.runtime == "torch eager" and r.precision == "fp32" and r.median_ms), None)
    for r in rows:
        if r.median_ms is None:
            continue
        if base is not None:
            r.ratio = base.median_ms / r.median_ms
        if r.gflops is not None:
            r.peak_fraction = (r.gflops / (r.median_ms / 1e3)) / peak


def survey_models(
    models: list[str] | None = None,
    imgsz: int | tuple[int, int] = 640,
    batch: int = 1,
    threads: int = 2,
    warmup: int = 2,
    iters: int = 5,
    num_classes: int = 80,
) -> list[Row]:
    """Every preset (or ``models``) in torch eager fp32: latency, GFLOPs, achieved GFLOP/s
    and its fraction of the fp32 matmul peak, all timed in turns in the same run."""
    cases = []
    for name in models or list_models():
        torch.manual_seed(0)
        model = prepare_model(build_model(name, num_classes=num_classes))
        size = as_size(imgsz, model.config)
        deploy = DeployModel(model, deploy_num_top(model.config)).eval()
        x = torch.randn(batch, 3, *size)
        sizes = torch.tensor([[float(size[0]), float(size[1])]] * batch)
        row = Row(name, "torch eager", "fp32", gflops=count_gflops(model, x))
        row.extra["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        row.extra["imgsz"] = list(size)
        cases.append(_Case(row, lambda d=deploy, x=x, s=sizes: d(x, s)))
    rows = _with_peak(cases, batch, warmup, iters, threads)
    for r in rows:
        r.ratio = None  # no common baseline across presets
    return rows


def _with_peak(cases: list[_Case], batch: int, warmup: int, iters: int, threads: int) -> list[Row]:
    """Time ``cases`` and a large fp32 matmul in turns; the peak is the matmul's best time,
    so it sees the same machine load as the rows it is compared with."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    peak_case = _Case(Row("fp32 matmul peak", "torch", "fp32", gflops=2 * n**3 / 1e9), lambda: torch.mm(a, b))
    _measure([peak_case, *cases], batch, warmup, iters, threads)
    peak = 2 * n**3 / min(peak_case.times) / 1e9
    head = peak_case.row
    head.median_ms = head.p90_ms = head.images_per_s = None
    head.note = f"{peak:.1f} GFLOP/s (best {n}x{n} sgemm) at {threads} threads"
    head.extra["peak_gflops"] = peak
    rows = [head, *(c.row for c in cases)]
    _finish(rows, peak)
    head.gflops = head.ratio = head.peak_fraction = None
    return rows


def rows_to_dicts(rows: list[Row]) -> list[dict[str, Any]]:
    """Plain dicts (for JSON) of ``rows``."""
    return [dataclasses.asdict(r) for r in rows]


def format_table(rows: list[Row]) -> str:
    """A Markdown table of ``rows`` (``-`` where a row has no number)."""

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    header = ["model", "runtime", "precision", "median ms", "p90 ms", "img/s", "ratio", "GFLOPs", "GFLOP/s", "% peak"]
    lines = ["| " + " | ".join(header + ["note"]) + " |", "|" + "|".join("---" for _ in range(len(header) + 1)) + "|"]
    for r in rows:
        achieved = r.gflops / (r.median_ms / 1e3) if r.gflops is not None and r.median_ms else None
        cells = [
            r.model,
            r.runtime,
            r.precision,
            num(r.median_ms, ".1f"),
            num(r.p90_ms, ".1f"),
            num(r.images_per_s, ".2f"),
            "-" if r.ratio is None else f"{r.ratio:.2f}x",
            num(r.gflops, ".1f"),
            num(achieved, ".1f"),
            "-" if r.peak_fraction is None else f"{100 * r.peak_fraction:.0f}%",
            r.note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
