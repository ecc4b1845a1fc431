"""Deprecated: the old home of the runtimes, exporters and prediction.

``decodet.deploy`` was split by job in 0.2 (``decodet.runtime``, ``decodet.export``,
``decodet.predict``, ``decodet.bench``, ``decodet.inference``).  The names it exported still
work here, with a ``DeprecationWarning`` naming the new home.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_MOVED = {
    "Detector": "decodet.runtime",
    "export_onnx": "decodet.export",
    "from_supervision": "decodet.predict",
    "to_supervision": "decodet.predict",
}

__all__ = list(_MOVED)


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"decodet.deploy.{name} moved to {_MOVED[name]}.{name}; decodet.deploy goes away in 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'decodet.deploy' has no attribute {name!r}")
