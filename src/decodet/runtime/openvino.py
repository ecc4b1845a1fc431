"""OpenVINO runtime: :class:`OvModel` compiles a decodet model (checkpoint, ONNX or IR, built by
:func:`decodet.export.openvino.load_for_precision`) for the CPU plugin and runs it with
:class:`~decodet.inference.ort.OrtModel`'s interface.  One process-wide ``ov.Core`` is shared
with the exporter (:func:`decodet.export.openvino.core`, why there is only one: see there)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from decodet.errors import DecodetError
from decodet.export.openvino import _require, core, load_for_precision
from decodet.inference.metadata import build_metadata

log = logging.getLogger(__name__)

# OpenVINO's INFERENCE_PRECISION_HINT per decodet precision (an int8 graph carries its own
# quantisation; the hint is for the float parts)
_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


class OvModel:
    """A compiled OpenVINO model with :class:`~decodet.inference.ort.OrtModel`'s interface:
    ``model(images=..., orig_sizes=...)`` on numpy arrays -> ``{"boxes", "scores", "labels"}``,
    ``input_shape(name)``, ``metadata`` (``export.build_metadata``'s keys).

    The file's batch dimension is dynamic, but OpenVINO's CPU plugin runs a graph compiled
    for one static shape faster (measured with int8 at batch 1: deco_tiny at 256 12.1 -> 8.3 ms,
    deco_r50 at 640 96 -> 90 ms): each input shape gets its own compiled copy, made on first
    use (batch 1 at construction), up to :attr:`MAX_SHAPES`; further shapes share one
    dynamic-shape compilation, so a server with many batch sizes neither recompiles nor grows.
    ``precision`` ``None``: the file's; ``threads``: ``INFERENCE_NUM_THREADS``; ``device``: an
    OpenVINO device name (``"cpu"`` -> ``CPU``); ``int8_scheme``: :data:`INT8_SCHEMES`.
    """

    MAX_SHAPES = 4

    def __init__(
        self,
        weights: Any,
        precision: str | None = None,
        threads: int | None = None,
        device: str = "cpu",
        imgsz: Any = None,
        num_top: int | None = None,
        calib_images: Any = None,
        calib_count: int = 32,
        int8_scheme: str = "smoothquant",
    ) -> None:
        self._ov = _require()
        model, info = load_for_precision(weights, precision, imgsz, num_top, calib_images, calib_count, int8_scheme)
        self.info = info
        self.metadata = build_metadata(info)
        hint = _HINT[info.precision]
        if hint == "bf16" and "BF16" not in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            # OpenVINO would run fp32 anyway; asking for bf16 regardless fails to compile ("bad
            # combination") with its instruction set capped below a CPU's bf16 (OV_CPU_MAX_ISA)
            hint = "f32"
        self._config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        self._target = str(device).split(":")[0].upper()
        self._model = model
        self._shapes = {p.get_any_name(): p.get_partial_shape() for p in model.inputs}
        self._runners: dict[tuple[int, ...] | None, tuple[Any, Any]] = {}
        first = [1 if d.is_dynamic else d.get_length() for d in self._shapes["images"]]
        self.compiled = self._runner(tuple(first))[0]  # fails here, not at the first image
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        if info.precision == "bf16" and "bf16" not in self.runtime_precisions().get("Convolution", set()):
            # judged by what OpenVINO compiled, not by its capability list: the two disagreed once
            # (the instruction set capped below AVX-512 BF16: no BF16 listed, bf16 compiled)
            log.warning("OpenVINO has no bf16 kernels on this CPU (AVX-512 BF16 or AMX): it runs the model in fp32")

    def runtime_precisions(self) -> dict[str, set[str]]:
        """Layer type -> the precisions OpenVINO's plugin compiled those layers in (first compilation)."""
        out: dict[str, set[str]] = {}
        for op in self.compiled.get_runtime_model().get_ops():
            rt = op.get_rt_info()
            out.setdefault(rt["layerType"].astype(str), set()).add(rt["runtimePrecision"].astype(str))
        return out

    def _compile(self, model: Any) -> Any:
        try:
            return core().compile_model(model, self._target, self._config)
        except Exception as exc:
            lines = [s for s in str(exc).splitlines() if s.strip() and not s.startswith("Exception from ")]
            reason = lines[0] if lines else type(exc).__name__  # OpenVINO's reason follows its source lines
            raise DecodetError(f"OpenVINO cannot compile the model for {self._target} ({reason[:300]})") from None

    def _runner(self, shape: tuple[int, ...]) -> tuple[Any, Any]:
        """``(compiled model, infer request)`` for images of ``shape``: a static-shape copy
        while fewer than :attr:`MAX_SHAPES` exist, else (and for a static graph, or a shape
        the graph does not accept, which OpenVINO then rejects) the file's own (key ``None``)."""
        key: tuple[int, ...] | None = shape
        if key not in self._runners:
            fits = self._shapes["images"].compatible(self._ov.PartialShape(list(shape)))
            if not fits or self._shapes["images"].is_static or len(self._runners) >= self.MAX_SHAPES:
                key, model = None, self._model
            else:
                model = self._model.clone()
                model.reshape({"images": list(shape), "orig_sizes": [shape[0], 2]})
            if key not in self._runners:
                compiled = self._compile(model)
                self._runners[key] = (compiled, compiled.create_infer_request())
        return self._runners[key]

    def input_shape(self, name: str) -> list[int | str]:
        shape = self._shapes[name]
        return [d.get_length() if d.is_static else "?" for d in shape]

    def __call__(self, inputs: dict[str, np.ndarray] | None = None, **kwargs: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {**(inputs or {}), **kwargs}
        compiled, request = self._runner(tuple(np.shape(feeds["images"])))
        result = request.infer(feeds)
        return {name: np.array(result[compiled.output(name)]) for name in self.output_names}
