"""The inference core: a model made ready for inference, and its post-processing.

:class:`DeployModel` is what :class:`~decodet.runtime.detector.Detector` runs on torch and
what :func:`~decodet.export.onnx.export_onnx` writes to ONNX, so both backends compute the
same graph.  :func:`prepare_model` makes the inference copy; :func:`as_size` and
:func:`normalization` give the input size and mean/std the model expects.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from decodet.config import ModelConfig, normalization
from decodet.errors import DecodetError
from decodet.models.postprocess import top_detections
from decodet.registry import deploy_imgsz

__all__ = ["DeployModel", "as_size", "normalization", "prepare_model"]


class DeployModel(nn.Module):
    """``model`` + its post-processing (:func:`~decodet.models.postprocess.top_detections`).

    ``forward(images [B, 3, H, W], orig_sizes [B, 2] (h, w) float)`` returns
    ``boxes [B, K, 4]`` xyxy pixels clipped to the image, ``scores [B, K]`` sorted,
    ``labels [B, K]`` int64 category ids, with ``K = min(num_top, Q * C)``.  No
    data-dependent shapes, so it exports to ONNX and runs batched.
    """

    def __init__(self, model: nn.Module, num_top: int) -> None:
        super().__init__()
        self.model = model
        self.num_top = int(num_top)
        cfg = model.config
        ids = cfg.category_ids if cfg.category_ids is not None else list(range(cfg.num_classes))
        self.register_buffer("category_ids", torch.as_tensor(ids, dtype=torch.int64), persistent=False)

    def forward(self, images: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model(images)
        return top_detections(
            out["pred_logits"], out["pred_boxes"], orig_sizes.float(), self.num_top, self.category_ids
        )


def as_size(imgsz: int | Iterable[int] | None, cfg: ModelConfig) -> tuple[int, int]:
    """``None`` -> the preset's deploy size (:func:`decodet.registry.deploy_imgsz`); ``n`` ->
    ``(n, n)``; ``(h, w)`` as is; checked."""
    if imgsz is None:
        return deploy_imgsz(cfg)
    size = (int(imgsz), int(imgsz)) if isinstance(imgsz, int) else tuple(int(v) for v in imgsz)
    if len(size) != 2 or min(size) < 32:
        raise DecodetError(f"image size must be (height, width) of at least 32 pixels, got {imgsz!r}")
    return size  # type: ignore[return-value]


def prepare_model(model_or_weights: nn.Module | str | os.PathLike) -> nn.Module:
    """An inference copy: loaded from a checkpoint, or a deep copy of the module (the
    caller's stays untouched); eval mode, fp32, CPU, re-parameterised by ``deploy()``
    where the model has it (DECO+'s RepVGG/BN fusion)."""
    if isinstance(model_or_weights, nn.Module):
        model = copy.deepcopy(getattr(model_or_weights, "module", model_or_weights))
    else:
        from decodet.io.checkpoint import load_model

        model = load_model(model_or_weights)
    if not hasattr(model, "config"):
        raise DecodetError(f"{type(model).__name__} is not a decodet model (it has no .config)")
    model = model.float().cpu().eval()
    if hasattr(model, "deploy"):
        model = model.deploy() or model
    for p in model.parameters():
        p.requires_grad_(False)
    return model
