"""Reduced-precision torch inference: bf16 weights and compute, fp32 where accuracy needs it.

:func:`to_bf16` turns an inference copy (:func:`~decodet.inference.graph.prepare_model`) into a bf16,
channels-last model (so oneDNN runs native bf16 convolutions, AVX-512 BF16 / AMX), except the modules of
:func:`fp32_modules`, which keep fp32 weights and compute:

* the class heads: scores are compared with each other (top-K over query x class, DECO+'s query selection) and
  bf16's 8-bit mantissa reorders near-ties;
* the box heads: ``sigmoid(delta + inverse_sigmoid(ref))`` turns one bf16 step (2^-8 relative) into up to 2-3
  px at 640 px.

They are well under 1% of the FLOPs, so fp32 there costs nothing measurable; box decoding and post-processing
run in fp32 too (their inputs are). Measured effects: README ("Precision and backends"). :func:`compile_model`
wraps any of these in ``torch.compile`` with Inductor's weight freezing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from decodet.errors import DecodetError
from decodet.inference import calibration
from decodet.inference.precision import FP32_HEADS, check_precision, fp32_modules

log = logging.getLogger(__name__)


def bf16_supported() -> bool:
    """Whether this CPU has native bf16 dot products (AVX-512 BF16 or AMX); without them oneDNN emulates bf16
    and it is slower than fp32."""
    with contextlib.suppress(Exception):
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


class Bf16Model(nn.Module):
    """A bf16 detector (module docstring): ``forward(images [B, 3, H, W] float)`` ->
    ``{"pred_logits": [B, Q, C] float32, "pred_boxes": [B, Q, 4] float32}``; images go in bf16 channels-last."""

    def __init__(self, model: nn.Module, keep: Iterable[str] = FP32_HEADS) -> None:
        super().__init__()
        self.config = model.config
        model = model.to(torch.bfloat16)
        self.fp32 = fp32_modules(model, keep)
        for name in self.fp32:
            model.get_submodule(name).float()
        for module in model.modules():
            if next(module.children(), None) is None and _own_tensor(module) is not None:
                module.register_forward_pre_hook(_cast_inputs)
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        x = images.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        out = self.model(x)
        return {"pred_logits": out["pred_logits"].float(), "pred_boxes": out["pred_boxes"].float()}


def _own_tensor(module: nn.Module) -> Tensor | None:
    for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        if t.is_floating_point():
            return t
    return None


def _cast_inputs(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: float tensor inputs -> the module's weight dtype, so fp32 and bf16 parts can mix."""
    dtype = _own_tensor(module).dtype  # type: ignore[union-attr]
    return tuple(a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)


def to_bf16(model: nn.Module, keep: Iterable[str] = FP32_HEADS) -> Bf16Model:
    """A prepared fp32 model (changed in place) -> :class:`Bf16Model`; warns without native bf16 (slower)."""
    if not bf16_supported():
        log.warning("this CPU has no native bf16 instructions (AVX-512 BF16 / AMX): bf16 will be slower than fp32")
    return Bf16Model(model, keep)


class Compiled(nn.Module):
    """``torch.compile`` of ``module`` with Inductor's weight freezing. Freezing
    (``torch._inductor.config.freezing``) treats the weights as constants: batch norms folded, convolution
    weights prepacked in oneDNN's blocked layout once instead of on every call. It applies to inference graphs
    only, so calls run under ``torch.inference_mode``. The first call per input shape compiles (seconds to
    minutes)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = module
        self.config = getattr(module, "config", None)
        self._compiled = torch.compile(module, dynamic=False)

    def forward(self, *args: Any) -> Any:
        import torch._inductor.config as inductor_config

        with torch.inference_mode(), inductor_config.patch(freezing=True):
            return self._compiled(*args)


def compile_model(module: nn.Module) -> Compiled:
    if not hasattr(torch, "compile"):
        raise DecodetError("compile=True needs torch.compile (PyTorch 2)")
    return Compiled(module)


def torch_runner(
    model: nn.Module,
    num_top: int,
    precision: str = "fp32",
    compile: bool = False,
    calib_images: Any = None,
    size: tuple[int, int] = (640, 640),
    norm: tuple[tuple[float, ...], tuple[float, ...]] = ((0.0,) * 3, (1.0,) * 3),
    calib_count: int = 32,
) -> nn.Module:
    """The module ``Detector`` runs on torch: ``(images [B, 3, H, W], orig_sizes [B, 2]) -> (boxes, scores,
    labels)`` (:class:`~decodet.inference.graph.DeployModel`'s signature) for a prepared fp32 ``model``
    (changed in place) at ``precision``, optionally compiled. int8 is PyTorch's PT2E quantisation
    (:mod:`decodet.runtime.pt2e`, x86 Inductor quantizer, always compiled), calibrated on ``calib_images`` at
    ``size`` normalised with ``norm``."""
    from decodet.inference.graph import DeployModel

    precision = check_precision(precision)
    if precision == "int8":
        try:
            from decodet.runtime.pt2e import quantize_pt2e
        except ImportError:
            raise DecodetError(
                "int8 on the torch backend needs decodet.runtime.pt2e (PT2E quantisation), missing from this "
                "install; use backend 'onnxruntime' or 'openvino' for int8"
            ) from None
        calib = calibration.calibration_tensor(calib_images, size, norm, calib_count)
        # compile=True: the oneDNN int8 graph compiled by Inductor (the benchmark's PT2E row; compiling takes
        # a minute or more); otherwise the lowered graph runs as it is.
        return quantize_pt2e(model, calib, num_top=num_top, mode="compiled" if compile else "lowered")
    inner = to_bf16(model) if precision == "bf16" else model
    runner = DeployModel(inner, num_top).eval()
    return compile_model(runner) if compile else runner
