"""Prediction on image folders and videos with drawn results (``images``, ``video``), and
conversion to and from ``supervision`` (``interop``)."""

from decodet.predict.interop import from_supervision, to_supervision

__all__ = ["from_supervision", "to_supervision"]
