"""int8 on x86 CPUs through PyTorch 2 export quantisation (PT2E) and Inductor.

:func:`quantize_pt2e` exports ``DeployModel`` with ``torch.export``, annotates it with the x86
Inductor quantizer (static, per-channel symmetric int8 weights, uint8 activations: VNNI/AMX's
u8 x s8), calibrates on real images, converts, lowers the quantize/dequantize pairs to oneDNN int8
convolutions and matmuls with prepacked weights (torchao's ``lower_pt2e_quantized_to_x86``) and
compiles the rest; the post-processing is not annotated and stays float.

Why lowering first: with torch 2.14 and torchao 0.18, ``torch.compile(converted,
options={"freezing": True})`` fails (``onednn.qconv_prepack`` has no fake-tensor kernel);
lowering folds the prepacking on real tensors before Inductor sees the graph.  The flow moved
from ``torch.ao.quantization`` to ``torchao.quantization.pt2e``; both are tried.  The result keeps
the ``DeployModel`` call::

    run = quantize_pt2e(model, calib_images)        # calib: [N, 3, H, W] preprocessed
    boxes, scores, labels = run(images, orig_sizes)  # [B, K, 4], [B, K], [B, K]
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from decodet.errors import DecodetError
from decodet.inference.graph import DeployModel, prepare_model
from decodet.registry import deploy_num_top

log = logging.getLogger(__name__)

PT2E_MODES = ("compiled", "lowered", "reference")


def _pt2e_api() -> tuple[Any, Any, Any, Any]:
    """``(prepare_pt2e, convert_pt2e, X86InductorQuantizer, default config)`` from torchao
    (or from older torch's ``torch.ao``); a :class:`DecodetError` when neither has them."""
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        try:
            import torch.ao.quantization.quantizer.x86_inductor_quantizer as xiq  # torch < 2.10
            from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
        except ImportError:
            raise DecodetError(
                f"PT2E int8 needs torchao with this torch {torch.__version__} (pip install torchao); "
                "torch.ao.quantization no longer ships the PT2E flow"
            ) from None
    return prepare_pt2e, convert_pt2e, xiq.X86InductorQuantizer, xiq.get_default_x86_inductor_quantization_config


class Pt2eModel(nn.Module):
    """The converted (and usually compiled) int8 ``DeployModel``; ``forward(images [B, 3, H, W],
    orig_sizes [B, 2]) -> (boxes [B, K, 4], scores [B, K], labels [B, K])``."""

    def __init__(self, graph: nn.Module, runner: Any, num_top: int, config: Any, fixed_batch: int | None) -> None:
        super().__init__()
        self.graph = graph
        self._run = runner
        self.num_top = num_top
        self.config = config
        self.fixed_batch = fixed_batch

    def train(self, mode: bool = True) -> Pt2eModel:
        """A no-op: the exported int8 graph is inference-only and refuses ``train()``/``eval()``
        (callers such as ``Detector`` put every runner in eval mode)."""
        return self

    def forward(self, images: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad():
            b = images.shape[0]
            if self.fixed_batch is not None and b != self.fixed_batch:
                return self._chunked(images, orig_sizes.float())
            return self._run(images, orig_sizes.float())

    def _chunked(self, images: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Run a batch of another size than the fixed one in fixed-size chunks (last one padded)."""
        step, outs = self.fixed_batch, []
        for start in range(0, images.shape[0], step):
            x, s = images[start : start + step], sizes[start : start + step]
            n = x.shape[0]
            if n < step:
                x = torch.cat([x, x[-1:].expand(step - n, -1, -1, -1)])
                s = torch.cat([s, s[-1:].expand(step - n, -1)])
            outs.append(tuple(t[:n] for t in self._run(x, s)))
        return tuple(torch.cat(parts) for parts in zip(*outs))  # type: ignore[return-value]


def quantize_pt2e(
    model: nn.Module | str,
    calib_images: Tensor,
    num_top: int | None = None,
    batch: int = 1,
    mode: str = "compiled",
    dynamic_batch: bool = False,
) -> Pt2eModel:
    """Static int8 of ``model`` with PT2E and the x86 Inductor quantizer (module docstring).

    ``calib_images``: ``[N, 3, H, W]`` preprocessed as for inference; ``H, W`` become the fixed
    input size.  ``batch``: calibration batch (the batch axis too unless ``dynamic_batch``; lowering
    specialises on it, so other sizes recompile or pad).  ``mode``: ``"compiled"`` (oneDNN int8,
    then ``torch.compile``: fastest, compiling takes minutes on large models), ``"lowered"``
    (oneDNN int8 kernels, no Inductor codegen) or ``"reference"`` (eager quantize/dequantize in
    float: slow, the same numbers up to rounding).
    """
    if mode not in PT2E_MODES:
        raise DecodetError(f"unknown PT2E mode {mode!r}; choose one of {', '.join(PT2E_MODES)}")
    prepare_pt2e, convert_pt2e, quantizer_cls, default_config = _pt2e_api()
    if calib_images.ndim != 4 or calib_images.shape[1] != 3 or calib_images.shape[0] < 1:
        raise DecodetError(f"calibration images must be [N, 3, H, W] with N >= 1, got {tuple(calib_images.shape)}")
    net = prepare_model(model)
    k = int(num_top) if num_top is not None else deploy_num_top(net.config)
    k = min(k, net.config.num_queries * net.config.num_classes)
    deploy = DeployModel(net, k).eval()
    h, w = calib_images.shape[-2:]
    b = max(2, batch) if dynamic_batch and mode == "reference" else max(1, batch)  # 1 would specialise the axis
    dynamic_batch = dynamic_batch and mode == "reference"
    example = (calib_images[:1].expand(b, -1, -1, -1).contiguous(), torch.tensor([[float(h), float(w)]] * b))
    dynamic_shapes = None
    if dynamic_batch:
        axis = torch.export.Dim("batch", min=1, max=4096)
        dynamic_shapes = {"images": {0: axis}, "orig_sizes": {0: axis}}
    try:
        exported = torch.export.export(deploy, example, dynamic_shapes=dynamic_shapes, strict=False).module()
        quantizer = quantizer_cls()
        quantizer.set_global(default_config())
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for start in range(0, calib_images.shape[0], max(1, batch)):
                chunk = calib_images[start : start + max(1, batch)]
                if not dynamic_batch and chunk.shape[0] < b:
                    chunk = torch.cat([chunk, chunk[-1:].expand(b - chunk.shape[0], -1, -1, -1)])
                prepared(chunk, torch.tensor([[float(h), float(w)]] * chunk.shape[0]))
        converted = convert_pt2e(prepared)
    except DecodetError:
        raise
    except Exception as exc:  # export / quantizer errors are long; keep the first line
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise DecodetError(f"PT2E int8 quantisation failed: {type(exc).__name__}: {first}") from exc
    runner: Any = converted
    if mode in ("lowered", "compiled"):
        from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86

        try:
            with torch.no_grad():
                runner = lower_pt2e_quantized_to_x86(converted, example)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise DecodetError(f"PT2E int8: lowering to oneDNN failed: {type(exc).__name__}: {first}") from exc
        if mode == "compiled":
            runner = torch.compile(runner)
    log.info("PT2E int8: %s at %dx%d, K=%d, %s", net.config.name, h, w, k, mode)
    # lowering re-exports at the example's batch: only the reference graph keeps a dynamic one
    fixed = None if dynamic_batch and mode == "reference" else b
    return Pt2eModel(converted, runner, k, net.config, fixed)
