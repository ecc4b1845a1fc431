"""``RunOptions``: how a model runs, one typed object for :class:`~decodet.runtime.detector.Detector`,
``decodet predict / eval / serve / benchmark`` and :class:`~decodet.serve.config.ServeConfig`.

Every field is declared once, here, with its default and its command-line help (and, where
not derived from the field, its flag and type): ``decodet.cli.options`` turns the fields into
flags.  A new option is a field here plus the code that uses it."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from decodet.errors import DecodetError
from decodet.export.openvino import INT8_SCHEMES
from decodet.inference.precision import RUNTIME_PRECISIONS, check_precision

BACKENDS = ("torch", "onnxruntime", "openvino")
#: keyword names of earlier releases -> today's (still accepted, with a DeprecationWarning)
RENAMED = {"calib": "calib_images", "threshold": "score_threshold", "num_top": "max_det", "max_dets": "max_det"}
#: ``decodet eval`` / ``evaluate_checkpoint``: on a GPU when there is one, a few images a batch
EVAL_DEFAULTS = {"device": "auto", "batch_size": 4}
T = TypeVar("T", bound="RunOptions")


def option(default: Any, help: str, **cli: Any) -> Any:
    """A field with its command-line metadata: ``help``; optionally ``flag`` (the option
    strings, default ``--field-name``), ``choices`` and ``type`` (default: the field's)."""
    return field(default=default, metadata={"help": help, **cli})


def renamed(kwargs: dict[str, Any], stacklevel: int = 3) -> dict[str, Any]:
    """``kwargs`` with the names of :data:`RENAMED` replaced by today's, warning once per call."""
    for old in set(kwargs) & set(RENAMED):
        new = RENAMED[old]
        warnings.warn(f"{old}= is deprecated; use {new}=", DeprecationWarning, stacklevel=stacklevel)
        kwargs[new] = kwargs.pop(old)
    return kwargs


@dataclass
class RunOptions:
    """How a model runs (``decodet predict / eval / serve`` flags of the same names).

    ``backend`` ``None``: ONNX Runtime for ``.onnx`` files, OpenVINO for ``.xml``, torch
    otherwise.  ``precision`` ``None``: an exported file's own, else fp32; torch bf16 keeps the
    heads fp32 (:mod:`decodet.runtime.precision`), torch int8 is PT2E (:mod:`decodet.runtime.pt2e`;
    with ``compile`` compiled by Inductor, else lowered to oneDNN int8 kernels), ONNX Runtime
    int8 a QDQ export and no bf16, OpenVINO bf16 its precision hint and int8 NNCF's
    ``int8_scheme`` (an IR exported with ``--int8-scheme full`` runs as written).
    ``calib_images`` ``None``: int8 calibrates on synthetic noise with a loud warning, fine for
    speed, not for accuracy.  ``imgsz``: ``(height, width)`` or an int for a square (default:
    the model's evaluation size).  ``score_threshold`` 0.0 keeps all ``max_det`` (what COCO
    evaluation wants).  ``device`` ``"auto"``: CUDA when available; for ONNX Runtime ``"cuda"``
    selects its CUDA provider.  ``threads``: ONNX Runtime / OpenVINO threads (serve: torch's too).
    """

    backend: str | None = option(None, "default: onnxruntime for .onnx, openvino for .xml, torch otherwise",
                                 choices=BACKENDS)  # fmt: skip
    precision: str | None = option(None, "inference precision (default: fp32, or an exported file's own)",
                                   choices=RUNTIME_PRECISIONS)  # fmt: skip
    compile: bool = option(False, "torch: torch.compile with weight freezing (first call per shape compiles)")
    calib_images: Any = option(None, "int8: calibration image folder, glob or files (default: the train split "
                               "of --data if the command has one, else synthetic noise)",
                               flag=("--calib",), type=str)  # fmt: skip
    calib_count: int = option(32, "int8: calibration images used at most")
    int8_scheme: str = option("smoothquant", "openvino int8: smoothquant (more accurate on DECO's encoder/decoder) "
                              "or full (residual adds int8 too: faster on ResNet-50 backbones)",
                              choices=tuple(INT8_SCHEMES))  # fmt: skip
    device: str = option("cpu", "torch device / ONNX Runtime provider: cpu, cuda, ... or auto")
    threads: int | None = option(None, "inference threads (default: the library's)")
    imgsz: int | tuple[int, int] | None = option(None, "inference size (default: the model's)", type=int)
    batch_size: int = option(1, "images per forward pass")
    max_det: int = option(100, "detections per image at most (top scores over query x class)")
    score_threshold: float = option(0.3, "detections scoring below it are dropped", flag=("--threshold",))
    classes: list[str | int] | None = option(None, "keep only detections of these classes (names or ids)",
                                             nargs="+", type=str)  # fmt: skip

    def __post_init__(self) -> None:
        if self.backend is not None and self.backend not in BACKENDS:
            raise DecodetError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.precision is not None:
            self.precision = check_precision(self.precision)
        if self.int8_scheme not in INT8_SCHEMES:
            raise DecodetError(f"unknown int8 scheme {self.int8_scheme!r}; choose one of {', '.join(INT8_SCHEMES)}")
        for ok, message in self._checks():
            if not ok:
                raise DecodetError(message)

    def _checks(self) -> list[tuple[bool, str]]:
        """(whether a value is valid, the message when not) for every checked field."""
        return [
            (self.max_det >= 1, f"max_det must be at least 1, got {self.max_det}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (0.0 <= self.score_threshold <= 1.0, f"score_threshold must be in [0, 1], got {self.score_threshold}"),
        ]

    @classmethod
    def build(cls: type[T], options: RunOptions | None = None, **kwargs: Any) -> T:
        """``options`` (default: the defaults) with ``kwargs`` replacing fields; names of
        earlier releases (:data:`RENAMED`) still work, with a DeprecationWarning."""
        kwargs = renamed(kwargs, stacklevel=4)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unexpected option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        base = {f.name: getattr(options, f.name) for f in fields(options) if f.name in names} if options else {}
        return cls(**{**base, **kwargs})
