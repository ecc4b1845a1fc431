"""Reuse a process's earlier fp32 ONNX export of the same weights at the same settings.

``torch.onnx.export`` (torch.export + onnxscript's optimiser) takes 15-40 s even for the
smallest preset, and one process often exports the same model several times: an fp32 and an
int8 export, OpenVINO and ONNX Runtime detectors built from one checkpoint, ``decodet benchmark``'s
rows, a sensitivity sweep after a plain export.  The fp32 graph depends only on the weights,
the model config, K, the input size, the batch axis, the opset and the library versions, so
it is kept (the file's bytes, the last :data:`MAX_ENTRIES`, small models only) under a digest
of all of them and copied instead of exported again.  Nothing is written outside the caller's
folder and nothing outlives the process.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from decodet.version import __version__

MAX_ENTRIES = 4
MAX_BYTES = 64 * 2**20  # larger graphs (ResNet-50 at 160 MB) are exported each time: memory first
_EXPORTS: OrderedDict[str, bytes] = OrderedDict()


def digest(model: nn.Module, *settings: object) -> str:
    """SHA-256 of ``model``'s state (names, dtypes, shapes, bytes) and ``settings``."""
    h = hashlib.sha256(repr((settings, torch.__version__, __version__)).encode())
    for name, value in model.state_dict().items():
        t = value.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def export_once(key: str, path: Path, export: Callable[[Path], None]) -> None:
    """Write the graph for ``key`` to ``path``: a copy of an earlier export, else ``export(path)``."""
    if key in _EXPORTS:
        _EXPORTS.move_to_end(key)
        path.write_bytes(_EXPORTS[key])
        return
    export(path)
    if path.stat().st_size <= MAX_BYTES:
        _EXPORTS[key] = path.read_bytes()
        while len(_EXPORTS) > MAX_ENTRIES:
            _EXPORTS.popitem(last=False)


def clear() -> None:
    """Forget every kept export."""
    _EXPORTS.clear()
