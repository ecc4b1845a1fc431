"""The runtimes behind :class:`~decodet.runtime.detector.Detector`: torch (fp32 / bf16 /
compiled, ``precision``; PT2E int8, ``pt2e``), ONNX Runtime (``ort``) and OpenVINO
(``openvino``)."""

from decodet.runtime.detector import Detector

__all__ = ["Detector"]
