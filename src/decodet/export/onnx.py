"""ONNX export of a detector *with* its post-processing (:class:`~decodet.inference.graph.DeployModel`,
the graph the torch backend of ``Detector`` runs too), optionally fp16 or int8.

The exported graph::

    images      [B, 3, H, W] float32, resized to (H, W), scaled to [0, 1] and normalised with the
                metadata's mean/std (none for ``normalize=False`` configs, e.g. DECO+)
    orig_sizes  [B, 2]       float32, (height, width) of each original image
      -> boxes  [B, K, 4]    float32, xyxy in original-image pixels
         scores [B, K]       float32, sigmoid scores, sorted high to low
         labels [B, K]       int64, dataset category ids (a constant gather inside the graph)

``K`` (``num_top``) is constant: the top-K (query, class) pairs of ``postprocess``; callers drop low scores.
``H, W`` are fixed (DECO's outputs depend on the input size; uneven adaptive pooling is exported by slicing,
``layers.adaptive_max_pool2d``), the batch too unless ``dynamic_batch``. ``metadata_props`` carry what
``Detector`` needs to use the file alone (format tag and version, decodet version, model config JSON, image
size, normalisation, K, precision, opset).

Precisions:
  * ``fp32`` — matches torch to ~1e-5.
  * ``int8`` — ONNX Runtime static QDQ quantisation (per-channel int8 weights, uint8 activations) of
    Conv/MatMul/Gemm only; the rest, post-processing included, stays float, and so do the layer groups a
    measured sensitivity sweep finds most harmful (``export/quantize.py``).
  * ``fp16`` — half weights and compute, float32 I/O and post-processing; for GPU providers (ONNX Runtime's
    CPU provider runs it but no faster: use int8 there).
  * ``bf16`` — refused: ONNX Runtime has no bf16 Conv kernels on CPU or CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decodet.config import normalization
from decodet.errors import DecodetError
from decodet.export import memo as export_memo
from decodet.inference.calibration import calibration_batches
from decodet.inference.graph import DeployModel, as_size, prepare_model
from decodet.inference.metadata import OnnxInfo, build_metadata
from decodet.inference.precision import ONNX_PRECISIONS, check_precision
from decodet.inference.scopes import name_scopes
from decodet.io.atomic import atomic_path
from decodet.registry import deploy_num_top
from decodet.version import __version__

log = logging.getLogger(__name__)

# The torch.export-based exporter writes opset 18+; converting DECO's graphs down fails
# (ONNX's version converter cannot move Reduce* axes inputs back into attributes).
MIN_OPSET = 18


def export_onnx(
    model_or_weights: nn.Module | str | os.PathLike,
    out_path: str | os.PathLike,
    imgsz: int | tuple[int, int] | None = None,
    opset: int | None = None,
    dynamic_batch: bool = False,
    precision: str = "fp32",
    calib_images: Any = None,
    num_top: int | None = None,
    batch: int = 1,
    calib_count: int = 32,
    int8: Any = None,
    sensitivity_report: str | os.PathLike | None = None,
    score_fn: Any = None,
) -> Path:
    """Export a detector and its post-processing to one ONNX file (module docstring); returns ``out_path``.

    Args:
        model_or_weights: a decodet model, or a checkpoint path (ours or the authors').
        imgsz: fixed input ``(height, width)`` or one int; default :func:`decodet.registry.deploy_imgsz`.
        opset: at least 18 (default: the exporter's).
        calib_images: int8 calibration images (anything ``Detector`` accepts; at most ``calib_count``).
            ``None``: synthetic noise, enough for speed tests only.
        num_top: K, detections per image (default: :func:`decodet.registry.deploy_num_top`).
        int8: :class:`decodet.export.quantize.Int8Options` (default: the measured sweep).
        sensitivity_report: int8: write the per-layer-group sweep here (Markdown, CSV beside it).
        score_fn: int8: ``score_fn(run) -> float`` (higher is better, e.g. COCO AP) to rank layer groups
            by instead of the output error vs fp32."""
    precision = _check_request(precision, opset)
    model = prepare_model(model_or_weights)
    cfg = model.config
    size = as_size(imgsz, cfg)
    k = int(num_top) if num_top is not None else deploy_num_top(cfg)
    k = min(k, cfg.num_queries * cfg.num_classes)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = DeployModel(model, k).eval()
    batch = max(1, int(batch))

    with tempfile.TemporaryDirectory(prefix="decodet-export-") as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        key = export_memo.digest(wrapper, repr(cfg), k, size, opset, dynamic_batch, batch)
        export_memo.export_once(key, fp32_path, lambda p: _torch_export(wrapper, p, size, opset, dynamic_batch, batch))
        extra_meta: dict[str, str] = {}
        final = Path(tmp) / f"{precision}.onnx"  # fp32: the exported file itself
        if precision == "int8":
            extra_meta = _quantize_int8(fp32_path, final, size, normalization(cfg), calib_images, calib_count,
                                        1 if dynamic_batch else batch, int8, sensitivity_report, score_fn)  # fmt: skip
        elif precision == "fp16":
            _convert_fp16(fp32_path, final)
        mean, std = normalization(cfg)
        info = OnnxInfo(cfg, size, k, precision, dynamic_batch, 0, __version__, mean, std)  # opset: the file's
        _save_with_metadata(final, out_path, info, extra_meta, opset)
    log.info("wrote %s (%s, %dx%d, K=%d)", out_path, precision, size[0], size[1], k)
    return out_path


def _check_request(precision: str, opset: int | None) -> str:
    """The precision, checked (bf16 refused), and the opset; fails early when onnx is missing."""
    precision = check_precision(precision, ONNX_PRECISIONS)
    if precision == "bf16":
        raise DecodetError(
            "bf16 ONNX export is not supported: ONNX Runtime has no bf16 convolution kernels, so the file "
            "could not run; use precision fp32 or int8 for CPU, fp16 for GPU"
        )
    if opset is not None and int(opset) < MIN_OPSET:
        raise DecodetError(f"opset {opset} is not supported: DECO exports at opset {MIN_OPSET} or newer")
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise DecodetError("ONNX export needs onnx, onnxscript, onnxruntime (pip install 'decodet[deploy]')") from None
    return precision


def _save_with_metadata(
    path: Path, out_path: Path, info: OnnxInfo, extra_meta: dict[str, str], opset: int | None
) -> None:
    """Write ``path`` to ``out_path`` (atomically) with decodet's metadata, the opset it has."""
    import onnx

    proto = onnx.load(str(path))
    actual_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset or 0)
    if opset is not None and actual_opset != int(opset):
        log.warning("asked for opset %s, the exporter wrote opset %s", opset, actual_opset)
    info = dataclasses.replace(info, opset=int(actual_opset))
    del proto.metadata_props[:]
    for key, value in (build_metadata(info) | extra_meta).items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "decodet"
    proto.producer_version = __version__
    with atomic_path(out_path) as tmp_out:
        onnx.save(proto, str(tmp_out))


def _torch_export(
    wrapper: DeployModel, path: Path, size: tuple[int, int], opset: int | None, dynamic_batch: bool, batch: int
) -> None:
    """torch.export-based ONNX export (the TorchScript exporter cannot do DECO's pooling)."""
    b = 2 if dynamic_batch else batch  # a batch of 1 would specialise the batch axis to 1
    images = torch.zeros(b, 3, *size)
    sizes = torch.tensor([[float(size[0]), float(size[1])]] * b)
    dynamic_shapes = None
    if dynamic_batch:
        axis = torch.export.Dim("batch", min=1, max=4096)
        dynamic_shapes = {"images": {0: axis}, "orig_sizes": {0: axis}}
    kwargs: dict[str, Any] = {"opset_version": opset} if opset is not None else {}
    try:
        with torch.no_grad(), _quiet_exporter():
            torch.onnx.export(
                wrapper,
                (images, sizes),
                str(path),
                dynamo=True,
                input_names=["images", "orig_sizes"],
                output_names=["boxes", "scores", "labels"],
                dynamic_shapes=dynamic_shapes,
                optimize=True,
                verbose=False,
                report=False,
                external_data=False,
                **kwargs,
            )
    except ImportError as exc:
        raise DecodetError(f"ONNX export needs onnxscript ({exc}); pip install 'decodet[deploy]'") from None
    except Exception as exc:  # the exporter's own errors are long reports; keep one line, chain the rest
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else type(exc).__name__)
        raise DecodetError(
            f"ONNX export failed at {size[0]}x{size[1]}, opset {opset or 'default'}: {reason[:300]}"
        ) from exc


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's INFO chatter and its axis-naming warning for the duration."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _quantize_int8(
    fp32_path: Path,
    out_path: Path,
    size: tuple[int, int],
    norm: tuple[tuple[float, ...], tuple[float, ...]],
    calib_images: Any,
    count: int,
    batch: int,
    options: Any = None,
    report: str | os.PathLike | None = None,
    score_fn: Any = None,
) -> dict[str, str]:
    """Static int8 (``export/quantize.py``); returns the ``int8_*`` metadata entries."""
    from decodet.export.quantize import quantize_onnx

    if calib_images is None:
        log.warning(
            "int8 CALIBRATION ON SYNTHETIC NOISE IMAGES: fine for speed tests, NOT for accuracy. "
            "Pass real images (export --data DATASET uses its training split, or --calib FOLDER)"
        )
    feeds = list(calibration_batches(calib_images, size, count, batch, norm))
    result = quantize_onnx(fp32_path, out_path, feeds, options, score_fn=score_fn, report=report)
    meta = result.metadata()
    meta["int8_calibration_images"] = "synthetic" if calib_images is None else str(min(count, len(feeds) * batch))
    return meta


def _convert_fp16(fp32_path: Path, out_path: Path) -> None:
    """Half weights/compute; float32 inputs, outputs and post-processing nodes."""
    import onnx

    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError:
        raise DecodetError("fp16 export needs onnxruntime's transformers tools (pip install onnxruntime)") from None
    proto = onnx.load(str(fp32_path))
    post = [n.name for n in proto.graph.node if not _in_submodule(n, "model")]
    half = convert_float_to_float16(proto, keep_io_types=True, node_block_list=post)
    _drop_cast_round_trips(half)
    onnx.save(half, str(out_path))


def _drop_cast_round_trips(proto: Any) -> None:
    """Replace ``Cast(to=float32)(Cast(to=float16)(x))`` by ``Identity(x)``: the converter casts blocked
    (post-processing) float32 outputs to half and back, which would round boxes and scores to fp16."""
    from onnx import TensorProto, helper

    nodes = list(proto.graph.node)
    producer = {out: n for n in nodes for out in n.output}
    outputs = {o.name for o in proto.graph.output}

    def cast_to(node: Any) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    new_nodes = []
    for n in nodes:
        first = producer.get(n.input[0]) if n.input else None
        if cast_to(n) == TensorProto.FLOAT and first is not None and cast_to(first) == TensorProto.FLOAT16:
            n = helper.make_node("Identity", [first.input[0]], list(n.output), name=n.name + "_identity")
        new_nodes.append(n)
    del proto.graph.node[:]
    proto.graph.node.extend(new_nodes)
    # casts to half that nothing reads any more
    used = {name for n in proto.graph.node for name in n.input} | outputs
    keep = [n for n in proto.graph.node if not (cast_to(n) == TensorProto.FLOAT16 and n.output[0] not in used)]
    del proto.graph.node[:]
    proto.graph.node.extend(keep)


def _in_submodule(node: Any, name: str) -> bool:
    """Whether the exporter recorded ``node`` as coming from ``DeployModel.<name>``."""
    scopes = name_scopes(node)
    return scopes is None or (len(scopes) > 1 and scopes[1] == name)
