"""int8 for ONNX Runtime that keeps its accuracy: calibrate once, sweep layer groups, keep the harmful ones in
fp32. Steps of :func:`quantize_onnx` (``export_onnx(precision="int8")``):

1. **Calibration** on real images (synthetic noise only with a warning): ORT's calibrator runs once and its
   ranges are cached in a file that every variant below reuses.
2. **Quantisation** (``Int8Options``): QDQ, per-channel symmetric int8 weights, uint8 activations by default
   (u8 x s8 is what x86 VNNI's ``vpdpbusd`` multiplies and ORT's CPU kernels use). ``reduce_range`` (7-bit
   weights) is on automatically on CPUs without VNNI, where u8 x s8 products can saturate 16-bit sums. Only
   Conv/MatMul/Gemm: post-processing stays float. 3. **Sensitivity sweep** (``exclude="auto"``): those nodes
   are grouped by module (name scopes cut at 4 levels, e.g. ``model.decoder.layers.0``); each group is
   quantised *alone* and compared with fp32 (:func:`detection_error` on the sweep images, or the drop of
   ``score_fn``, e.g. COCO AP). The ``max_excluded`` worst groups stay fp32 if each costs at least
   ``min_share`` of quantising everything. Sweep, rule and excluded groups go into the ``int8_*`` metadata
   and, when asked, a Markdown/CSV report.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from decodet.errors import DecodetError
from decodet.inference.scopes import name_scopes
from decodet.io.atomic import atomic_path
from decodet.utils.machine import cpu_has_vnni

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
GROUP_DEPTH = 4  # module-path components kept in a group name (model.backbone.body.layer1)

Feed = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]
ScoreFn = Callable[[Callable[[Feed], Outputs]], float]


@dataclass
class Int8Options:
    """How to quantise (module docstring). ``exclude``: ``"auto"`` (sweep, keep the worst groups in fp32),
    ``None``/``"none"`` (quantise everything) or a list of group names (:func:`layer_groups`) or node names."""

    calibrate: str = "minmax"
    activation: str = "uint8"
    reduce_range: bool | None = None  # None: True exactly when the CPU lacks VNNI
    exclude: str | Sequence[str] | None = "auto"
    max_excluded: int = 3
    min_share: float = 0.1
    percentile: float = 99.999


@dataclass
class SweepRow:
    group: str
    nodes: int
    harm: float  # error (or score drop) when only this group is int8
    score: float | None = None


@dataclass
class QuantResult:
    """What :func:`quantize_onnx` did, for the metadata and the report."""

    excluded_groups: list[str] = field(default_factory=list)
    excluded_nodes: list[str] = field(default_factory=list)
    sweep: list[SweepRow] = field(default_factory=list)
    metric: str = "detection_error"
    full_harm: float | None = None
    final_harm: float | None = None
    fp32_score: float | None = None
    rule: str = ""
    options: Int8Options = field(default_factory=Int8Options)

    def metadata(self) -> dict[str, str]:
        o = self.options
        return {
            "int8_activation": o.activation,
            "int8_weights": "int8 per-channel symmetric",
            "int8_reduce_range": json.dumps(bool(o.reduce_range)),
            "int8_calibration": o.calibrate,
            "int8_excluded_groups": json.dumps(self.excluded_groups),
            "int8_excluded_nodes": json.dumps(self.excluded_nodes),
            "int8_selection": self.rule,
            "int8_sweep": json.dumps(
                {"metric": self.metric, "full": self.full_harm, "final": self.final_harm}
                | {r.group: round(r.harm, 6) for r in self.sweep}
            ),
        }


def group_of(node: Any) -> str:
    """The layer group of an ONNX node: the deepest module path among its name scopes, cut at ``GROUP_DEPTH``
    components (``model.decoder.layers.0``); ``(unscoped)`` without scopes."""
    paths = [s for s in (name_scopes(node) or []) if s.startswith("model.") or s == "model"]
    if not paths:
        return "(unscoped)"
    return ".".join(max(paths, key=len).split(".")[:GROUP_DEPTH])


def layer_groups(proto: Any) -> dict[str, list[str]]:
    """``{group: [node names]}`` of the quantisable nodes (Conv/MatMul/Gemm), in graph order."""
    groups: dict[str, list[str]] = {}
    for node in proto.graph.node:
        if node.op_type in QUANTIZED_OPS:
            groups.setdefault(group_of(node), []).append(node.name)
    return groups


def detection_error(ref: Outputs, got: Outputs) -> float:
    """How far ``got``'s detections are from ``ref``'s (0 = same), over a batch. For each reference detection
    ``j`` (score ``s_j``): ``1 - max_i IoU(j, i) * min(s_i, s_j) / max(s_i, s_j)`` over ``got``'s detections
    ``i`` of the same label; averaged with weights ``s_j``, so confident detections count most. Inputs:
    ``boxes [B, K, 4]``, ``scores [B, K]``, ``labels [B, K]``."""
    from torchvision.ops import box_iou

    num = den = 0.0
    for b in range(ref["scores"].shape[0]):
        rb, rs, rl = (torch.from_numpy(np.asarray(ref[k][b])) for k in ("boxes", "scores", "labels"))
        gb, gs, gl = (torch.from_numpy(np.asarray(got[k][b])) for k in ("boxes", "scores", "labels"))
        iou = box_iou(rb.double(), gb.double())
        ratio = torch.minimum(rs[:, None], gs[None]) / torch.maximum(rs[:, None], gs[None]).clamp_min(1e-12)
        match = (iou * ratio.double() * (rl[:, None] == gl[None])).amax(dim=1)
        w = rs.double()
        num += float((w * (1 - match)).sum())
        den += float(w.sum())
    return num / max(den, 1e-12)


def _ort_types(options: Int8Options) -> tuple[Any, Any, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantType

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    if options.calibrate not in methods:
        raise DecodetError(f"unknown int8 calibration {options.calibrate!r}; choose one of {', '.join(methods)}")
    acts = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    if options.activation not in acts:
        raise DecodetError(f"unknown int8 activation type {options.activation!r}; choose uint8 or int8")
    return methods[options.calibrate], acts[options.activation], QuantType.QInt8


class _Reader:
    """``CalibrationDataReader`` over a list of feeds."""

    def __init__(self, feeds: list[Feed]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> Feed | None:
        return next(self._it, None)

    def __iter__(self) -> Iterator[Feed]:
        return iter(self.get_next, None)


class _Quantizer:
    """Calibrates once (ranges cached in ``tmp``) and writes quantised variants on demand."""

    def __init__(self, pre_path: Path, feeds: list[Feed], options: Int8Options, tmp: Path) -> None:
        self.pre_path, self.options, self.tmp = pre_path, options, tmp
        self.cache = tmp / "calibration.json"
        self.method, self.act_type, self.weight_type = _ort_types(options)
        self._count = 0
        self._feeds: list[Feed] | None = feeds

    def write(self, out: Path, exclude: Sequence[str]) -> Path:
        from onnxruntime.quantization import QuantFormat, quantize_static

        extra: dict[str, Any] = {"ActivationSymmetric": self.options.activation == "int8", "WeightSymmetric": True}
        if self.options.calibrate == "percentile":
            extra["CalibPercentile"] = self.options.percentile
        reader = _Reader(self._feeds) if self._feeds is not None else None
        quantize_static(
            str(self.pre_path),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            reduce_range=bool(self.options.reduce_range),
            activation_type=self.act_type,
            weight_type=self.weight_type,
            nodes_to_exclude=list(exclude),
            calibrate_method=self.method,
            extra_options=extra,
            calibration_cache_path=str(self.cache),
        )
        self._feeds = None  # ranges are cached now
        return out

    def variant(self, exclude: Sequence[str]) -> Path:
        self._count += 1
        return self.write(self.tmp / f"variant{self._count}.onnx", exclude)


def _session(path: Path, threads: int | None) -> Callable[[Feed], Outputs]:
    from decodet.inference.ort import OrtModel

    model = OrtModel(path, threads=threads)
    return lambda feed: model(feed)


def _evaluate(run: Callable[[Feed], Outputs], feeds: list[Feed], ref: list[Outputs]) -> float:
    errors = [detection_error(r, run(f)) for f, r in zip(feeds, ref)]
    return float(np.mean(errors)) if errors else 0.0


def quantize_onnx(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calib_feeds: list[Feed],
    options: Int8Options | None = None,
    sweep_feeds: list[Feed] | None = None,
    score_fn: ScoreFn | None = None,
    report: str | os.PathLike | None = None,
    threads: int | None = None,
) -> QuantResult:
    """Quantise ``fp32_path`` (a decodet export) to ``out_path`` (module docstring).

    Args:
        calib_feeds: calibration inputs ``{"images", "orig_sizes"}`` (numpy).
        sweep_feeds: inputs for the sensitivity sweep (default: ``calib_feeds``).
        score_fn: ``score_fn(run) -> float`` (higher is better, e.g. COCO AP of a runner on a labelled
            split); when given the sweep ranks groups by its drop.
        report: write the sweep as Markdown here (and as CSV beside it, same stem).
        threads: ONNX Runtime threads for the sweep."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    options = options or Int8Options()
    if options.reduce_range is None:
        options.reduce_range = not cpu_has_vnni()
    if not calib_feeds:
        raise DecodetError("int8 quantisation needs at least one calibration image")
    result = QuantResult(options=options)
    with tempfile.TemporaryDirectory(prefix="decodet-int8-") as tmp_name:
        tmp = Path(tmp_name)
        pre = tmp / "pre.onnx"
        # ONNX's own shape inference is enough for a convolutional graph. ORT's symbolic one gives up on
        # decodet's post-processing and, when it does, dumps its partial model (``sym_shape_infer_temp.onnx``
        # and a 20 MB ``<uuid>.data``) into the current folder.
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        groups = _present_groups(Path(fp32_path), pre)
        exclude = options.exclude
        given = None if exclude in (None, "none", "auto") else [exclude] if isinstance(exclude, str) else list(exclude)
        unknown = [n for n in given or [] if n not in groups and not any(n in g for g in groups.values())]
        if unknown:  # a wrong name fails before calibrating
            raise DecodetError(f"unknown layer group or node to keep in fp32: {', '.join(unknown)}")
        quantizer = _Quantizer(pre, calib_feeds, options, tmp)
        full = quantizer.variant([])  # calibrates (once) and caches the ranges
        sweep_wanted = exclude == "auto" or report is not None
        judge = _Judge(Path(fp32_path), sweep_feeds or calib_feeds, score_fn, threads)
        if sweep_wanted:
            _sweep(result, quantizer, groups, full, judge)
        if exclude == "auto":
            result.excluded_groups = _select(result, options)
        elif given is not None:
            result.excluded_groups = [n for n in given if n in groups]
            result.excluded_nodes = [n for n in given if n not in groups]
            result.rule = "given by the caller"
        else:
            result.rule = "none: every Conv/MatMul/Gemm is int8"
        result.excluded_nodes += [n for g in result.excluded_groups for n in groups[g]]
        if result.excluded_nodes:
            final = quantizer.variant(result.excluded_nodes)
            if sweep_wanted:
                result.final_harm = judge.harm(final)
        else:
            final = full
            result.final_harm = result.full_harm
        with atomic_path(Path(out_path)) as tmp_out:
            onnx.save(onnx.load(str(final)), str(tmp_out))
    if report is not None:
        write_report(result, report)
    log.info(
        "int8: %s calibration, %s activations, kept in fp32: %s",
        options.calibrate,
        options.activation,
        ", ".join(result.excluded_groups) or "nothing",
    )
    return result


def _present_groups(fp32_path: Path, pre: Path) -> dict[str, list[str]]:
    """:func:`layer_groups` of the fp32 file, limited to the nodes the pre-processed file still has (ORT's
    optimiser keeps node names but drops their name scopes)."""
    import onnx

    present = {n.name for n in onnx.load(str(pre), load_external_data=False).graph.node}
    groups = {g: [n for n in names if n in present] for g, names in layer_groups(onnx.load(str(fp32_path))).items()}
    return {g: names for g, names in groups.items() if names}


@dataclass
class _Judge:
    """Scores a variant against fp32: ``score_fn``'s drop, or :func:`detection_error` on ``feeds``."""

    fp32_path: Path
    feeds: list[Feed]
    score_fn: ScoreFn | None
    threads: int | None
    fp32_score: float | None = None
    _ref: list[Outputs] | None = None

    def harm(self, path: Path) -> float:
        run = _session(path, self.threads)
        if self.score_fn is not None:
            if self.fp32_score is None:
                self.fp32_score = float(self.score_fn(_session(self.fp32_path, self.threads)))
            return self.fp32_score - float(self.score_fn(run))
        if self._ref is None:
            fp32 = _session(self.fp32_path, self.threads)
            self._ref = [fp32(f) for f in self.feeds]
        return _evaluate(run, self.feeds, self._ref)


def _sweep(result: QuantResult, quantizer: _Quantizer, groups: dict[str, list[str]], full: Path, judge: _Judge) -> None:
    """Quantise each group alone; record how much it hurts (error, or score drop)."""
    if judge.score_fn is not None:
        result.metric = "score drop"
    result.full_harm = judge.harm(full)
    result.fp32_score = judge.fp32_score
    all_nodes = [n for names in groups.values() for n in names]
    for i, (group, names) in enumerate(groups.items()):
        only = set(names)
        path = quantizer.variant([n for n in all_nodes if n not in only])
        harm = judge.harm(path)
        score = None if judge.fp32_score is None else judge.fp32_score - harm
        result.sweep.append(SweepRow(group, len(names), harm, score))
        log.info("int8 sweep %d/%d: %s (%d nodes): %.5f", i + 1, len(groups), group, len(names), harm)
        path.unlink(missing_ok=True)


def _select(result: QuantResult, options: Int8Options) -> list[str]:
    """The ``max_excluded`` most harmful groups whose harm is at least ``min_share`` of all-int8's."""
    full = result.full_harm or 0.0
    result.rule = (
        f"top {options.max_excluded} groups by {result.metric} when quantised alone, "
        f"each at least {options.min_share:g} of the all-int8 {result.metric} ({full:.5f})"
    )
    if full <= 0:  # quantising everything does not hurt measurably: nothing to keep in fp32
        return []
    ranked = sorted(result.sweep, key=lambda r: r.harm, reverse=True)
    return [r.group for r in ranked[: options.max_excluded] if r.harm >= options.min_share * full and r.harm > 0]


def write_report(result: QuantResult, path: str | os.PathLike) -> Path:
    """The sweep as a Markdown table (``path``) and a CSV (same stem, ``.csv``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    o = result.options
    lines = [
        "# int8 sensitivity sweep",
        "",
        f"Each layer group quantised alone (the rest fp32); harm = {result.metric} against fp32 "
        "(0 = identical; higher hurts more).",
        f"Calibration {o.calibrate}, activations {o.activation}, per-channel int8 weights, "
        f"reduce_range {bool(o.reduce_range)}.",
        "",
        f"- all groups int8: {_fmt(result.full_harm)}",
        f"- kept in fp32: {', '.join(result.excluded_groups) or 'none'} ({result.rule})",
        f"- after keeping them: {_fmt(result.final_harm)}",
        "",
        "| group | nodes | harm | kept fp32 |",
        "|---|---|---|---|",
    ]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["group", "nodes", "harm", "score", "kept_fp32"])
    for r in sorted(result.sweep, key=lambda r: r.harm, reverse=True):
        kept = r.group in result.excluded_groups
        lines.append(f"| {r.group} | {r.nodes} | {r.harm:.5f} | {'yes' if kept else ''} |")
        writer.writerow([r.group, r.nodes, f"{r.harm:.6f}", "" if r.score is None else f"{r.score:.6f}", int(kept)])
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    with atomic_path(path.with_suffix(".csv")) as tmp:
        Path(tmp).write_text(buf.getvalue())
    return path


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.5f}"
