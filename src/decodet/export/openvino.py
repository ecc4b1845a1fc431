"""OpenVINO models from decodet's graph, fp32 / bf16 / int8, and the IR export; the runtime that compiles and
runs them is :class:`decodet.runtime.openvino.OvModel`.

The graph is :class:`~decodet.inference.graph.DeployModel` as :func:`~decodet.export.onnx.export_onnx` writes
it, read from the ``.onnx`` file or from an IR (``.xml`` + ``.bin``) written by :func:`export_openvino` with
the same metadata (in ``rt_info`` under ``framework``, where OpenVINO keeps ONNX ``metadata_props``).

Precisions:
  * ``fp32`` — ``INFERENCE_PRECISION_HINT f32`` (else OpenVINO picks bf16 on CPUs that have it).
  * ``bf16`` — ``INFERENCE_PRECISION_HINT bf16``: convolutions and matrix products in bf16, with OpenVINO's
    own fp32 islands; weights stay fp32 in the file.
  * ``int8`` — NNCF post-training quantisation (``MIXED`` preset: symmetric per-channel weights, asymmetric
    activations) calibrated on real images; the heads (:data:`FP32_HEADS`) and post-processing stay float, and
    under ``full`` the backbone's stem (:data:`FLOAT_STEM`). Schemes (:data:`INT8_SCHEMES`): ``smoothquant``
    (default, NNCF's transformer scheme: activation outliers of the LayerNorm -> Linear pairs move into the
    weights; only weighted layers' inputs are int8, residual adds stay float) and ``full`` (NNCF's CNN scheme:
    every elementwise op int8 too; faster on big backbones, less accurate on DECO's encoder and decoder).
    Measurements: docs/benchmarks.md ("Moved from source docstrings").

OpenVINO and NNCF are optional. Both report usage to Google Analytics unless the user declined; decodet
imports them with their telemetry switched off (:func:`_no_telemetry`), leaving alone a user who opted in
explicitly (``opt_in_out --opt_in``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from decodet.errors import DecodetError
from decodet.export.onnx import export_onnx
from decodet.inference.calibration import calibration_batches
from decodet.inference.metadata import OnnxInfo, build_metadata, parse_metadata
from decodet.inference.precision import FP32_HEADS, check_precision
from decodet.inference.scopes import name_scopes
from decodet.version import __version__

log = logging.getLogger(__name__)


def _require(module: str = "openvino") -> Any:
    if module in sys.modules:
        return sys.modules[module]
    try:
        with _no_telemetry():
            return __import__(module)
    except ImportError:
        raise DecodetError(f"the openvino backend needs {module}: pip install openvino nncf") from None


# Read when the libraries are imported: openvino-telemetry declines for tools that pass it ``disable_in_ci``
# (OpenVINO's model converter, imported by ``import openvino``, and NNCF do) when ``CI=true``; NNCF swaps its
# telemetry for a stub under ``NNCF_CI`` (nncf.definitions). Measured (``decodet export --format openvino
# --precision int8``, no consent file): 6 look-ups of www.google-analytics.com before, none after, and no
# ~/intel client id.
_TELEMETRY_OFF = {"CI": "true", "NNCF_CI": "1"}


@contextlib.contextmanager
def _no_telemetry() -> Iterator[None]:
    """Import OpenVINO / NNCF inside this to keep their telemetry off: the variables of :data:`_TELEMETRY_OFF`
    set for the import only (``NNCF_CI`` only where unset), unless the user opted in explicitly
    (:func:`_telemetry_opted_in`)."""
    if _telemetry_opted_in():
        yield
        return
    saved = {name: os.environ.get(name) for name in _TELEMETRY_OFF}
    os.environ["CI"] = _TELEMETRY_OFF["CI"]
    os.environ.setdefault("NNCF_CI", _TELEMETRY_OFF["NNCF_CI"])
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _telemetry_opted_in() -> bool:
    """Whether the user's OpenVINO consent file (``opt_in_out --opt_in``) says yes; no file, ``--opt_out`` or
    no ``openvino-telemetry``: no."""
    try:
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker

        result = OptInChecker().check(enable_opt_in_dialog=False, disable_in_ci=False)
    except Exception:  # absent, or another version's internals: treat as not opted in
        return False
    return result == ConsentCheckResult.ACCEPTED


@functools.cache
def core() -> Any:
    """The process's one ``openvino.Core``: every compilation and query goes through it. Each Core's CPU
    plugin swaps the thread's alternate signal stack for its own on creation and restores the one it found
    when destroyed, unmapping its own: two Cores destroyed in creation order leave the thread on an unmapped
    stack, and the next signal to a Python handler (``SA_ONSTACK``: SIGCHLD under DataLoader, SIGINT, SIGTERM)
    segfaults past faulthandler (the test suite's crash; a hazard for ``decodet serve``). One Core, never
    destroyed, swaps once (tests/test_openvino.py reproduces the crash with two Cores)."""
    return _require().Core()


def read_model(path: str | os.PathLike) -> tuple[Any, OnnxInfo]:
    """An ``openvino.Model`` from a decodet ``.onnx`` or ``.xml`` file, and its metadata."""
    path = Path(path)
    if not path.is_file():
        raise DecodetError("model file not found", path)
    try:
        model = core().read_model(str(path))
    except Exception as exc:  # OpenVINO raises its own RuntimeError subclasses with long text
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DecodetError(f"OpenVINO cannot read this model ({reason[:300]})", path) from None
    rt = model.get_rt_info()
    meta: dict[str, str] = {}
    if "framework" in rt:
        section = rt["framework"]
        meta = {str(k): section[k].astype(str) for k in section.keys()}  # noqa: SIM118 (RTMap has no items())
    return model, parse_metadata(meta, path)


# The backbone's stem stays float in int8 under ``full``: all-int8 lost 10 AP points on the demo deco_tiny,
# float stem 0.7 (``conv1_2`` alone accounts for it; calibration choices did not help), for 5% of deco_r50's
# int8 latency. Under ``smoothquant`` a float stem measured no better, so it is int8. Figures:
# docs/benchmarks.md ("Moved from source docstrings").
FLOAT_STEM = re.compile(r"\bbackbone(\.body)?\.(conv1|bn1|stem)\b")

#: OpenVINO int8 schemes (module docstring): name -> NNCF model type.
INT8_SCHEMES = {"smoothquant": "TRANSFORMER", "full": None}


def _float_node_names(onnx_path: Path, stem: bool = True) -> list[str]:
    """OpenVINO names of the nodes NNCF must leave float: the class and box heads and (``stem``) the
    backbone's stem, found through the exporter's name scopes (:func:`name_scopes`).

    OpenVINO keeps an ONNX node's name as its friendly name, except that a convolution or matrix product with
    a bias becomes ``NAME/WithoutBiases`` followed by an ``Add`` called ``NAME``: both names are listed (an
    ignored scope of only ``NAME`` misses the convolution)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    names = []
    for node in proto.graph.node:
        scopes = name_scopes(node) or []
        head = any(part in FP32_HEADS for scope in scopes for part in scope.split("."))
        if head or (stem and any(FLOAT_STEM.search(scope) for scope in scopes)):
            names += [node.name, f"{node.name}/WithoutBiases"]
    return names


def quantize_int8(
    model: Any,
    info: OnnxInfo,
    calib_images: Any,
    calib_count: int = 32,
    ignored: list[str] | None = None,
    scheme: str = "smoothquant",
) -> Any:
    """NNCF post-training int8 quantisation of ``model`` (an ``openvino.Model``); ``ignored`` node names stay
    float; ``scheme`` one of :data:`INT8_SCHEMES`. ``calib_images`` None: synthetic noise, with a warning."""
    nncf = _require("nncf")
    model_type = _check_scheme(scheme)
    if calib_images is None:
        log.warning("int8 calibration on synthetic noise images: fine for speed, NOT for accuracy (pass calib images)")
    batches = list(calibration_batches(calib_images, tuple(info.imgsz), calib_count, 1, (info.mean, info.std)))
    dataset = nncf.Dataset(batches)
    scope = nncf.IgnoredScope(names=list(ignored or []), validate=False)
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.WARNING)  # NNCF logs every node it leaves unquantised at INFO
    try:
        return nncf.quantize(
            model,
            dataset,
            preset=nncf.QuantizationPreset.MIXED,
            model_type=getattr(nncf.ModelType, model_type) if model_type else None,
            subset_size=len(batches),
            ignored_scope=scope,
        )
    finally:
        nncf_log.setLevel(level)


def _check_scheme(scheme: str) -> str | None:
    if scheme not in INT8_SCHEMES:
        raise DecodetError(f"unknown OpenVINO int8 scheme {scheme!r}; choose one of {', '.join(INT8_SCHEMES)}")
    return INT8_SCHEMES[scheme]


def _onnx_for(weights: Any, imgsz: Any, num_top: int | None, tmp: Path) -> Path:
    """The ONNX file to start from: ``weights`` itself, or a fresh fp32 dynamic-batch export."""
    if isinstance(weights, str | os.PathLike) and str(weights).lower().endswith(".onnx"):
        return Path(weights)
    log.info("exporting the model to ONNX for OpenVINO (once)")
    return export_onnx(weights, tmp / "model.onnx", imgsz=imgsz, dynamic_batch=True, num_top=num_top)


def load_for_precision(
    weights: Any,
    precision: str | None,
    imgsz: Any = None,
    num_top: int | None = None,
    calib_images: Any = None,
    calib_count: int = 32,
    int8_scheme: str = "smoothquant",
) -> tuple[Any, OnnxInfo]:
    """``(openvino.Model, metadata)`` of a checkpoint, ``.onnx`` or ``.xml`` file, quantised to int8 when
    asked and not already int8. ``precision`` None: the file's own (fp32 for checkpoints)."""
    _check_scheme(int8_scheme)  # before any export
    with tempfile.TemporaryDirectory(prefix="decodet-ov-") as tmp:
        is_xml = isinstance(weights, str | os.PathLike) and str(weights).lower().endswith(".xml")
        src = Path(weights) if is_xml else _onnx_for(weights, imgsz, num_top, Path(tmp))
        model, info = read_model(src)
        want = check_precision(precision or ("int8" if info.precision == "int8" else info.precision))
        if info.precision == "int8" and want != "int8":
            raise DecodetError(f"this file is int8; {want} needs the fp32 export", src)
        if info.precision == "fp16":
            raise DecodetError("fp16 files are meant for GPUs; give OpenVINO the fp32 export", src)
        if want == "int8" and info.precision != "int8":
            ignored = [] if is_xml else _float_node_names(src, stem=int8_scheme == "full")
            model = quantize_int8(model, info, calib_images, calib_count, ignored, int8_scheme)
        info.precision = want
    return model, info


def export_openvino(
    model_or_weights: Any,
    out_path: str | os.PathLike,
    imgsz: int | tuple[int, int] | None = None,
    precision: str = "fp32",
    calib_images: Any = None,
    num_top: int | None = None,
    calib_count: int = 32,
    int8_scheme: str = "smoothquant",
) -> Path:
    """Write an OpenVINO IR (``out_path`` ``.xml`` + its ``.bin``) of a checkpoint or a decodet ONNX file,
    dynamic batch, with the ONNX metadata (``precision`` records how to run it: fp32 and bf16 files hold fp32
    weights, int8 files NNCF's quantised graph). Returns the ``.xml`` path."""
    ov = _require()
    precision = check_precision(precision)
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".xml":
        raise DecodetError("an OpenVINO IR is written as NAME.xml (+ NAME.bin)", out_path)
    model, info = load_for_precision(
        model_or_weights, precision, imgsz, num_top, calib_images, calib_count, int8_scheme
    )
    info.decodet_version = __version__
    for key, value in build_metadata(info).items():
        model.set_rt_info(value, ["framework", key])
    if precision == "int8" and info.precision == "int8":
        model.set_rt_info(int8_scheme, ["framework", "int8_scheme"])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".decodet-ir-", dir=out_path.parent) as tmp:
        tmp_xml = Path(tmp) / out_path.name
        ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
        os.replace(tmp_xml.with_suffix(".bin"), out_path.with_suffix(".bin"))  # weights first, then the graph
        shutil.move(str(tmp_xml), str(out_path))
    log.info("wrote %s (%s, %s)", out_path, precision, json.dumps(list(info.imgsz)))
    return out_path
