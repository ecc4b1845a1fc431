"""Side-by-side inference speed (and accuracy) of one DECO model: one table, every row measured in the same
run, each on the model *with* its post-processing (``DeployModel``, what the ONNX file holds). Rows: torch
eager fp32 (the baseline), bf16 and bf16 autocast, ``torch.compile``, ONNX Runtime fp32 / int8, PT2E int8,
OpenVINO fp32 / bf16 / int8 (both schemes), GPU rows with CUDA, and Hugging Face DETR-R50 / RT-DETR-R18 from
their configs (forward only). A row whose backend is missing says so in its note instead of failing.

Conventions:
  * latency: median and p90 of ``iters`` batch-``batch`` calls after ``warmup``; "img/s b8":
    ``throughput_batch`` / median of a call with that many images. Rows are timed in turns, so load from other
    processes falls on all rows alike.
  * GFLOPs: ``FlopCounterMode`` on one eager fp32 forward (multiply-add = 2; convolutions and matmuls only),
    the same for every row of a model whatever its precision.
  * "% peak": row GFLOP/s / the 2048x2048 matmul peak of the row's own precision (mixed rows: the lowest
    precision their big kernels use), peaks timed in turns with the rows.
  * ratio: eager fp32 median / the row's (> 1 is faster). AP (with an ``accuracy`` evaluator): COCO box AP of
    each row's runner on the validation split, and its change in points (x100).
  * ONNX Runtime sessions do not spin-wait here (idle threads would slow the next row).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from decodet.bench.cases import Case, Row, Runner, fail
from decodet.config import normalization
from decodet.inference.graph import DeployModel, as_size, prepare_model
from decodet.registry import build_model, deploy_num_top, list_models
from decodet.runtime.options import renamed
from decodet.utils.machine import peak_calls

log = logging.getLogger(__name__)

Accuracy = Callable[[Runner, tuple[int, int], tuple[float, ...], tuple[float, ...]], dict[str, float]]
PEAK_RUNTIME = "matmul peak"


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


def _time(case: Case, x: Any, s: Any) -> float:
    start = time.perf_counter()
    case.runner(x, s)  # type: ignore[misc]
    if case.sync is not None:
        case.sync()
    return time.perf_counter() - start


def _measure(cases: list[Case], inputs: tuple[Any, ...], warmup: int, iters: int, threads: int) -> None:
    """Warm every case up, then time them round-robin (module docstring). ``inputs`` is ``(x1, s1, x8, s8)``;
    ``x8`` is ``None`` without a throughput column."""
    x1, s1, x8, s8 = inputs
    with torch_threads(threads), torch.no_grad():
        for case in cases:
            if case.runner is None:
                continue
            try:
                case.row.extra["first_call_s"] = _time(case, x1, s1)  # compilation / warm-up, not timed
                if x8 is not None and case.row.runtime != PEAK_RUNTIME:
                    case.row.extra["first_call_b8_s"] = _time(case, x8, s8)
                for _ in range(warmup):
                    _time(case, x1, s1)
            except Exception as exc:  # a failing row must not sink the table
                fail(case.row, exc)
                case.runner = None
        live = [c for c in cases if c.runner is not None]
        for _ in range(max(1, iters)):
            for case in live:
                case.times.append(_time(case, x1, s1))
                if x8 is not None and case.row.runtime != PEAK_RUNTIME:
                    case.times8.append(_time(case, x8, s8))
    batch = x1.shape[0] if hasattr(x1, "shape") else 1
    for case in live:
        med = statistics.median(case.times)
        row = case.row
        row.median_ms, row.p90_ms = med * 1e3, _percentile(case.times, 0.9) * 1e3
        row.images_per_s = batch / med
        row.extra["best_ms"] = min(case.times) * 1e3
        if case.times8:
            row.throughput = x8.shape[0] / statistics.median(case.times8)
        if row.runtime.startswith("torch.compile") or row.runtime.startswith("PT2E"):
            row.note = (row.note + "; " if row.note else "") + f"compiling took {row.extra['first_call_s']:.0f} s"


def _peak_cases() -> list[Case]:
    cases = []
    for key, (call, gflop) in peak_calls().items():
        row = Row(PEAK_RUNTIME, PEAK_RUNTIME, key, gflops=gflop, peak_key=key)
        cases.append(Case(row, lambda _x, _s, c=call: c()))
    return cases


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
    include_pt2e: bool = True,
    include_openvino: bool = True,
    weights: str | None = None,
    num_classes: int = 80,
    throughput_batch: int = 8,
    calib_images: Any = None,
    accuracy: Accuracy | None = None,
    only: list[str] | None = None,
    **old: Any,
) -> list[Row]:
    """Benchmark one model every way (module docstring): the matmul peaks, DECO torch eager fp32 (the ratio
    and AP baseline), then the others, all prepared first, then timed in turns.
    ``weights``: a checkpoint instead of random weights. ``throughput_batch``: batch of the images/s column
    (0: none). ``calib_images``: int8 calibration images (``None``: synthetic noise, for speed only;
    ``calib``: deprecated name). ``accuracy``: ``accuracy(runner, imgsz, mean, std) -> COCO stats``
    (:class:`decodet.evaluation.deployed.RunnerEvaluator`) for the AP column. ``only``: keep rows whose
    ``"runtime precision"`` contains one of these strings."""
    from decodet.bench.rows import build_cases

    old = renamed(old)
    calib_images = old.pop("calib_images", calib_images)
    if old:
        raise TypeError(f"run_benchmark() got unexpected keyword arguments {', '.join(sorted(old))}")
    torch.manual_seed(0)
    source = weights if weights is not None else build_model(model_name, num_classes=num_classes)
    model = prepare_model(source)
    size = as_size(imgsz, model.config)
    k = deploy_num_top(model.config)
    x1 = torch.randn(batch, 3, *size)
    s1 = torch.tensor([[float(size[0]), float(size[1])]] * batch)
    x8 = s8 = None
    if throughput_batch:
        x8 = torch.randn(throughput_batch, 3, *size)
        s8 = torch.tensor([[float(size[0]), float(size[1])]] * throughput_batch)
    gflops = count_gflops(model, x1)
    flags = {
        "compile": include_compile,
        "onnx": include_onnx,
        "pt2e": include_pt2e,
        "openvino": include_openvino,
    }
    with tempfile.TemporaryDirectory(prefix="decodet-bench-") as tmp, _no_ort_spinning():
        want = (lambda rt, prec: _selected(f"{rt} {prec}", only)) if only else (lambda _rt, _prec: True)
        cases = build_cases(model, size, k, threads, gflops, calib_images, Path(tmp), flags, x1, want)
        if include_hf and want("HF", "fp32"):
            cases += _hf_cases(size, batch, num_classes)
        peaks = _peak_cases()
        _measure([*peaks, *cases], (x1, s1, x8, s8), warmup, iters, threads)
        rows = [c.row for c in [*peaks, *cases]]
        finish(rows)
        if accuracy is not None:
            _accuracy(cases, accuracy, size, normalization(model.config), threads)
    return rows


@contextlib.contextmanager
def _no_ort_spinning() -> Iterator[None]:
    """Sessions made meanwhile do not spin-wait (``inference/ort.ALLOW_SPINNING``; module docstring)."""
    from decodet.inference import ort

    old = ort.ALLOW_SPINNING
    ort.ALLOW_SPINNING = False
    try:
        yield
    finally:
        ort.ALLOW_SPINNING = old


def _selected(label: str, only: list[str]) -> bool:
    """Whether a row labelled ``"runtime precision"`` matches one of ``only`` (substrings)."""
    return any(o.lower() in label.lower() for o in only)


def _accuracy(cases: list[Case], accuracy: Accuracy, size: tuple[int, int], norm: Any, threads: int) -> None:
    """Fill ``ap`` / ``ap_delta`` for every row that has a runner (not the HF rows)."""
    base = None
    with torch_threads(threads), torch.no_grad():
        for case in cases:
            if case.runner is None or case.row.model.startswith("HF "):
                continue
            try:
                stats = accuracy(case.runner, size, norm[0], norm[1])
            except Exception as exc:
                case.row.note = (case.row.note + "; " if case.row.note else "") + f"AP failed: {exc}"[:200]
                continue
            case.row.ap = float(stats["AP"])
            case.row.extra["AP50"] = float(stats.get("AP50", float("nan")))
            if base is None and case.row.runtime == "torch eager" and case.row.precision == "fp32":
                base = case.row.ap
            if base is not None:
                case.row.ap_delta = 100 * (case.row.ap - base)


def finish(rows: list[Row]) -> None:
    """Ratios against DECO eager fp32 and each row's fraction of its precision's ``matmul peak`` row."""
    peaks = {
        r.precision: r.gflops / (r.extra.get("best_ms", r.median_ms) / 1e3)
        for r in rows
        if r.runtime == PEAK_RUNTIME and r.median_ms
    }
    base = next((r for r in rows if r.runtime == "torch eager" and r.precision == "fp32" and r.median_ms), None)
    for r in rows:
        if r.median_ms is None:
            continue
        if r.runtime == PEAK_RUNTIME:
            r.extra["peak_gflops"] = peaks[r.precision]
            r.peak_fraction = 1.0
            continue
        if base is not None:
            r.ratio = base.median_ms / r.median_ms
        if r.gflops is not None and r.peak_key in peaks:
            r.peak_fraction = (r.gflops / (r.median_ms / 1e3)) / peaks[r.peak_key]


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


def _hf_cases(size: tuple[int, int], batch: int, num_classes: int) -> list[Case]:
    labels = ("HF DETR-R50", "HF RT-DETR-R18")
    try:
        builders = _hf_models(num_classes)
    except ImportError:
        note = "skipped: transformers is not installed (pip install 'decodet[bench]')"
        return [Case(Row(label, "torch eager", "fp32", note=note)) for label in labels]
    cases = []
    x = torch.randn(batch, 3, *size)
    for label, build in builders:
        row = Row(label, "torch eager", "fp32")
        try:
            torch.manual_seed(0)
            hf = build().eval()
            row.gflops = count_gflops(hf, pixel_values=x)
        except Exception as exc:
            cases.append(Case(fail(row, exc)))
            continue
        cases.append(Case(row, lambda images, _s, m=hf: m(pixel_values=images)))
    return cases


def survey_models(
    models: list[str] | None = None,
    imgsz: int | tuple[int, int] = 640,
    batch: int = 1,
    threads: int = 2,
    warmup: int = 2,
    iters: int = 5,
    num_classes: int = 80,
) -> list[Row]:
    """Every preset (or ``models``) in torch eager fp32: latency, GFLOPs, GFLOP/s, % of the fp32 matmul peak."""
    cases = []
    x1 = s1 = None
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
        cases.append(Case(row, lambda _x, _s, d=deploy, x=x, s=sizes: d(x, s)))
        x1, s1 = x, sizes
    peaks = [c for c in _peak_cases() if c.row.precision == "fp32"]
    _measure([*peaks, *cases], (x1, s1, None, None), warmup, iters, threads)
    rows = [c.row for c in [*peaks, *cases]]
    finish(rows)
    for r in rows:
        r.ratio = None  # no common baseline across presets
    return rows


def rows_to_dicts(rows: list[Row]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(r) for r in rows]


def achieved_gflops(row: Row) -> float | None:
    """GFLOP/s of a timed row: one call's count over its median time (a peak row's: best time)."""
    if row.gflops is None or not row.median_ms:
        return None
    if row.runtime == PEAK_RUNTIME:
        return row.extra.get("peak_gflops")
    return row.gflops / (row.median_ms / 1e3)


def format_table(rows: list[Row], throughput_batch: int = 8) -> str:
    """A Markdown table of ``rows`` (``-``: no number)."""

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    header = ["model", "runtime", "precision", "median ms", "p90 ms", "img/s", f"img/s b{throughput_batch}"]
    header += ["ratio", "GFLOPs", "GFLOP/s", "% own peak", "AP", "dAP"]
    lines = ["| " + " | ".join(header + ["note"]) + " |", "|" + "|".join("---" for _ in range(len(header) + 1)) + "|"]
    for r in rows:
        peak = r.runtime == PEAK_RUNTIME
        cells = [
            r.model,
            "-" if peak else r.runtime,
            r.precision,
            "-" if peak else num(r.median_ms, ".1f"),
            "-" if peak else num(r.p90_ms, ".1f"),
            "-" if peak else num(r.images_per_s, ".2f"),
            num(r.throughput, ".2f"),
            "-" if r.ratio is None else f"{r.ratio:.2f}x",
            "-" if peak else num(r.gflops, ".1f"),
            num(achieved_gflops(r), ".1f"),
            "-" if r.peak_fraction is None or peak else f"{100 * r.peak_fraction:.0f}% ({r.peak_key})",
            num(r.ap, ".4f"),
            "-" if r.ap_delta is None else f"{r.ap_delta:+.2f}",
            r.note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
