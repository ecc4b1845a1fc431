"""The precisions decodet knows, in one place: what a model runs at (:data:`RUNTIME_PRECISIONS`,
``Detector`` on every backend) and what an ONNX file holds (:data:`ONNX_PRECISIONS`), and the
modules that stay fp32 in a bf16 model (:data:`FP32_HEADS`, why: ``decodet.runtime.precision``)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from decodet.errors import DecodetError

#: what a model runs at, on any backend
RUNTIME_PRECISIONS = ("fp32", "bf16", "int8")
#: what ``export_onnx`` is asked for (fp16 for GPU providers; bf16 only to be refused with a reason)
ONNX_PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# Module-name suffixes that stay fp32 in bf16 mode (see the module docstring).
FP32_HEADS = ("class_heads", "box_heads", "dec_score_head", "dec_bbox_head", "enc_score_head", "enc_bbox_head")


def check_precision(precision: str, allowed: tuple[str, ...] = RUNTIME_PRECISIONS) -> str:
    """``precision`` lower-cased, or a :class:`DecodetError` naming the ``allowed`` ones."""
    p = str(precision).lower()
    if p not in allowed:
        raise DecodetError(f"unknown precision {precision!r}; choose one of {', '.join(allowed)}")
    return p


def fp32_modules(model: nn.Module, keep: Iterable[str] = FP32_HEADS) -> list[str]:
    """Qualified names of ``model``'s submodules whose last name part is in ``keep``."""
    keep = tuple(keep)
    return [name for name, _ in model.named_modules() if name and name.rsplit(".", 1)[-1] in keep]
