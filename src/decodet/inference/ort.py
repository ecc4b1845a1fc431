"""A thin ONNX Runtime session: load once, run on numpy arrays, read the model's metadata."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from decodet.errors import DecodetError

log = logging.getLogger(__name__)

#: ONNX Runtime's intra-op threads spin-wait after each run by default (lower latency for one
#: session alone).  In a process that alternates runtimes (``decodet benchmark``) the spinning
#: threads take the cores from whatever runs next (measured: a torch forward 2-4x slower right
#: after an ORT run on 2 cores), so the benchmark turns it off while it runs.
ALLOW_SPINNING = True


class OrtModel:
    """An ``onnxruntime.InferenceSession`` with our defaults.

    Graph optimisation level ALL, sequential execution, ``threads`` intra-op threads
    (``None``: ONNX Runtime's default, one per physical core).  ``device="cuda"`` puts the
    CUDA provider first when this install has it (CPU stays as the fallback).

    ``model(**inputs)`` / ``model(inputs)`` takes numpy arrays by input name and returns
    ``{output name: array}``; ``metadata`` is the file's ``metadata_props`` as a dict.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, device: str = "cpu") -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise DecodetError("onnxruntime is not installed (pip install 'decodet[deploy]')") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise DecodetError("ONNX file not found", self.path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
        if not ALLOW_SPINNING:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda"):
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            else:
                log.warning("onnxruntime has no CUDA provider in this install; running on CPU")
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:  # ORT raises its own pybind exception types for bad files
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DecodetError(f"ONNX Runtime cannot load this model ({reason[:300]})", self.path) from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def input_shape(self, name: str) -> list[int | str | None]:
        """Declared shape of input ``name`` (symbolic axes as their names)."""
        for i in self.session.get_inputs():
            if i.name == name:
                return list(i.shape)
        raise KeyError(name)

    def __call__(self, inputs: dict[str, np.ndarray] | None = None, **kwargs: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {**(inputs or {}), **kwargs}
        outs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outs))
