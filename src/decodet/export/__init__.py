"""Exporters: ONNX (fp32 / fp16 / int8, ``onnx``, ``quantize``), OpenVINO IR (``openvino``) and
the browser page (``web``)."""

from decodet.export.onnx import export_onnx

__all__ = ["export_onnx"]
