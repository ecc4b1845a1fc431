"""Deployment: the Detector (torch / ONNX Runtime), ONNX export, drawing, video, benchmarks."""

from decodet.deploy.detector import Detector
from decodet.deploy.export import export_onnx
from decodet.deploy.interop import from_supervision, to_supervision

__all__ = ["Detector", "export_onnx", "from_supervision", "to_supervision"]
