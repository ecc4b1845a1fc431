"""Deployment: the Detector (torch / ONNX Runtime), ONNX export, drawing, benchmarks."""

from decodet.deploy.detector import Detector
from decodet.deploy.export import export_onnx

__all__ = ["Detector", "export_onnx"]
