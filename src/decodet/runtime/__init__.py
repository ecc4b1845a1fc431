"""The runtimes behind :class:`~decodet.runtime.detector.Detector`: torch (fp32 / bf16 /
compiled, ``precision``; PT2E int8, ``pt2e``), ONNX Runtime (``ort``) and OpenVINO
(``openvino``); how a model runs, :class:`~decodet.runtime.options.RunOptions` (``options``).
``Detector`` is loaded on first use: the command line reads the options without it."""

from typing import Any

__all__ = ["Detector"]


def __getattr__(name: str) -> Any:
    if name == "Detector":
        from decodet.runtime.detector import Detector

        return Detector
    raise AttributeError(name)
