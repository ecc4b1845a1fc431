"""The rows of ``decodet benchmark`` (``bench/benchmark.py``): how each runtime and precision
is built into a runner ``run(images [B, 3, H, W], orig_sizes [B, 2]) -> (boxes, scores,
labels)``.  Each builder catches its own failure: a backend missing from this install or
build gives a row with a note ("not available: ..."), never a broken table."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from decodet.bench.cases import Case, Row, fail
from decodet.config import normalization
from decodet.errors import DecodetError
from decodet.export.onnx import export_onnx
from decodet.inference.calibration import calibration_tensor
from decodet.inference.graph import DeployModel
from decodet.runtime.detector import Detector

log = logging.getLogger(__name__)


class _Autocast(nn.Module):
    """``module`` under bf16/fp16 autocast, float32 outputs (what a compiled bf16 row runs)."""

    def __init__(self, module: nn.Module, device: str = "cpu", dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.module, self.device, self.dtype = module, device, dtype

    def forward(self, images: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.autocast(self.device, dtype=self.dtype):
            boxes, scores, labels = self.module(images, sizes)
        return boxes.float(), scores.float(), labels


def _detector(row: Row, weights: Any, k: int, threads: int, **kwargs: Any) -> Case:
    """A row run by ``Detector(weights, **kwargs).predict_batch``; 'not available' when this
    install lacks the backend or precision."""
    try:
        det = Detector(weights, score_threshold=0.0, max_det=k, threads=threads, **kwargs)
    except (DecodetError, ImportError) as exc:
        return Case(fail(row, exc, "not available"))
    except Exception as exc:
        return Case(fail(row, exc))
    return Case(row, det.predict_batch)


def build_cases(
    model: nn.Module,
    size: tuple[int, int],
    k: int,
    threads: int,
    gflops: float,
    calib: Any,
    tmp: Path,
    flags: dict[str, bool],
    x1: Tensor,
    want: Callable[[str, str], bool] = lambda _runtime, _precision: True,
) -> list[Case]:
    """Every DECO row for ``model`` (already ``prepare_model``-ed), eager fp32 first.

    ``want(runtime, precision)`` says which rows to build (the eager fp32 baseline always is):
    a row left out costs nothing, not even its export or int8 calibration."""
    name = model.config.name

    def row(runtime: str, precision: str, peak: str) -> Row:
        return Row(name, runtime, precision, gflops=gflops, peak_key=peak)

    deploy = DeployModel(model, k).eval()
    cases = [_detector(row("torch eager", "fp32", "fp32"), model, k, threads)]

    def add(runtime: str, precision: str, build: Callable[[Row], Case], peak: str | None = None) -> None:
        if want(runtime, precision):
            cases.append(build(row(runtime, precision, peak or precision.split()[0])))

    add("torch eager", "bf16", lambda r: _detector(r, model, k, threads, precision="bf16"))
    add("torch eager", "bf16 autocast", lambda r: Case(r, _Autocast(deploy)))
    if flags.get("compile"):
        add("torch.compile", "fp32", lambda r: Case(r, _compiled(deploy)))
        add("torch.compile", "bf16", lambda r: Case(r, _compiled(_Autocast(deploy))))
    if flags.get("onnx"):
        for precision in ("fp32", "int8"):
            add("onnxruntime", precision, lambda r, p=precision: _onnx_case(r, model, size, k, threads, calib, tmp, p))
    if flags.get("pt2e"):
        add("PT2E", "int8", lambda r: _pt2e_case(r, model, size, k, calib))
    if flags.get("openvino"):
        for precision in ("fp32", "bf16", "int8"):
            extra = {"calib_images": calib} if precision == "int8" else {}
            add("openvino", precision, lambda r, p=precision, e=extra: _detector(
                r, model, k, threads, backend="openvino", precision=p, **e))  # fmt: skip
        add("openvino", "int8 full", lambda r: _openvino_full(r, model, size, k, threads, calib, tmp))
    if want("cuda", "gpu"):
        cases += _gpu_cases(row, model, k, tmp)
    return cases


def _openvino_full(
    row: Row, model: nn.Module, size: tuple[int, int], k: int, threads: int, calib: Any, tmp: Path
) -> Case:
    """OpenVINO int8 with the ``full`` scheme (residual adds int8 too), as a user gets it:
    ``decodet export --format openvino --precision int8 --int8-scheme full``, then the IR."""
    try:
        from decodet.export.openvino import export_openvino

        xml = export_openvino(model, tmp / "int8_full.xml", size, "int8", calib, k, int8_scheme="full")
    except (DecodetError, ImportError) as exc:
        return Case(fail(row, exc, "not available"))
    except Exception as exc:
        return Case(fail(row, exc))
    return _detector(row, str(xml), k, threads)


def _compiled(module: nn.Module) -> Any:
    """``torch.compile`` with weight freezing (weights folded as constants, oneDNN-prepacked),
    compiled lazily on the first call so a compiler failure fails only its row."""
    compiled: Any = None

    def call(images: Tensor, sizes: Tensor) -> Any:
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(module, options={"freezing": True})
        return compiled(images, sizes)

    return call


def _onnx_case(
    r: Row, model: nn.Module, size: tuple[int, int], k: int, threads: int, calib: Any, tmp: Path, precision: str
) -> Case:
    try:
        path = export_onnx(
            model, tmp / f"{precision}.onnx", imgsz=size, precision=precision, dynamic_batch=True, num_top=k,
            calib_images=calib,
        )  # fmt: skip
    except Exception as exc:
        return Case(fail(r, exc))
    case = _detector(r, path, k, threads)
    if precision == "int8":
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        r.extra["int8_excluded_groups"] = meta.get("int8_excluded_groups")
        r.note = f"fp32 kept: {meta.get('int8_excluded_groups', '[]')}"
    return case


def _pt2e_case(r: Row, model: nn.Module, size: tuple[int, int], k: int, calib: Any) -> Case:
    try:
        from decodet.runtime.pt2e import quantize_pt2e

        images = calibration_tensor(calib, size, normalization(model.config), 16)
        quantized = quantize_pt2e(model, images, num_top=k, mode="compiled")
    except Exception as exc:
        return Case(fail(r, exc, "not available" if isinstance(exc, DecodetError) else "failed"))
    r.note = "batch 1 graph (b8 runs as 8 calls)"
    return Case(r, quantized)


def _gpu_cases(row: Any, model: nn.Module, k: int, tmp: Path) -> list[Case]:
    """CUDA eager fp16/bf16 autocast, torch.compile fp16, ONNX Runtime CUDA / TensorRT: only
    with a CUDA device; times include the host-to-device copy of the batch."""
    if not torch.cuda.is_available():
        return [Case(Row("GPU rows", "cuda", "-", note="skipped: no CUDA device"))]
    dev = DeployModel(model, k).cuda().eval()
    sync = torch.cuda.synchronize

    def on_gpu(module: Any) -> Any:
        return lambda x, s: module(x.cuda(non_blocking=True), s.cuda(non_blocking=True))

    cases = [
        Case(row("cuda eager", "fp32", "gpu"), on_gpu(dev), sync=sync),
        Case(row("cuda eager", "fp16 autocast", "gpu"), on_gpu(_Autocast(dev, "cuda", torch.float16)), sync=sync),
        Case(row("cuda eager", "bf16 autocast", "gpu"), on_gpu(_Autocast(dev, "cuda", torch.bfloat16)), sync=sync),
    ]
    compiled = _compiled(_Autocast(dev, "cuda", torch.float16))
    cases.append(Case(row("cuda torch.compile", "fp16", "gpu"), on_gpu(compiled), sync=sync))
    try:
        path = export_onnx(model, tmp / "gpu_fp16.onnx", precision="fp16", dynamic_batch=True, num_top=k)
    except Exception as exc:
        return [*cases, Case(fail(row("onnxruntime cuda", "fp16", "gpu"), exc))]
    cases.append(_detector(row("onnxruntime cuda", "fp16", "gpu"), path, k, None, device="cuda"))  # type: ignore[arg-type]
    cases.append(_tensorrt_case(row("onnxruntime tensorrt", "fp16", "gpu"), path))
    return cases


def _tensorrt_case(r: Row, path: Path) -> Case:
    try:
        import onnxruntime as ort

        if "TensorrtExecutionProvider" not in ort.get_available_providers():
            r.note = "skipped: this onnxruntime has no TensorRT execution provider"
            return Case(r)
        providers = [("TensorrtExecutionProvider", {"trt_fp16_enable": True}), "CUDAExecutionProvider"]
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as exc:
        return Case(fail(r, exc))

    def run(x: Tensor, s: Tensor) -> tuple[Tensor, ...]:
        out = session.run(["boxes", "scores", "labels"], {"images": x.numpy(), "orig_sizes": s.numpy()})
        return tuple(torch.from_numpy(o) for o in out)

    return Case(r, run)
