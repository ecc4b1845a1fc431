"""decodet: DECO (Detection ConvNets) and DECO+ — DETR-style set prediction, all convolution.

Public API::

    list_models, build_model, load_model, convert_official, build_criterion,
    postprocess, evaluate_coco, Detector, RunOptions, DecodetError, train, TrainResult

Weights arguments also take the names of the authors' released checkpoints
(``"decoplus_r18.coco"``, ...: ``decodet.io.hub.WEIGHTS``), downloaded once into a cache.
"""

from __future__ import annotations

from typing import Any

from decodet.errors import DecodetError
from decodet.registry import build_model, list_models
from decodet.version import __version__

# Heavier parts load on first use so `import decodet` stays quick.
_LAZY = {
    "load_model": "decodet.io.checkpoint",
    "save_model": "decodet.io.checkpoint",
    "convert_official": "decodet.io.checkpoint",
    "build_criterion": "decodet.losses",
    "postprocess": "decodet.models.postprocess",
    "evaluate_coco": "decodet.evaluation.evaluator",
    "Detector": "decodet.runtime.detector",
    "RunOptions": "decodet.runtime.options",
    "train": "decodet.engine.api",
    "TrainResult": "decodet.engine.api",
}

__all__ = ["__version__", "DecodetError", "build_model", "list_models", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'decodet' has no attribute {name!r}")
