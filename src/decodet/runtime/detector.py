"""``Detector``: any image in, detections out, on PyTorch, ONNX Runtime or OpenVINO, fp32 / bf16 / int8.

>>> det = Detector("runs/exp/best.safetensors", score_threshold=0.3)
>>> for result in det.stream("photos/", batch_size=8):
...     print(result["path"], result["names"], result["boxes"])

Every image is resized to one fixed ``imgsz`` (aspect ratio not kept), the evaluation
transform of the ``light``/``rtdetr`` recipes.  DECO's outputs depend on padding, and a
fixed size means no padding is ever needed: results do not depend on the batch an image
was in, batches need no size grouping, and the same size exports to ONNX.  The default
size is the preset's deploy default (:func:`decodet.registry.deploy_imgsz`): DECO+'s
``eval_size`` (the size it was trained at); DECO has none and gets 640x640 (the authors evaluate DECO
at short side 800 keeping the aspect ratio: pass e.g. ``imgsz=(800, 1216)`` for 2:3
landscape images to get close to that).

Results, one dict per image, in input order (torchvision-style, CPU tensors)::

    boxes   [N, 4] float32  xyxy in original-image pixels, clipped to the image (as ``postprocess``)
    scores  [N]    float32  sorted high to low, all >= score_threshold
    labels  [N]    int64    dataset category ids (``config.category_ids``)
    names   list[str]       class names (the label number when the model has no names)
    path    str | None      the image file, when the input was one
    orig_size (h, w)        of the original image
    frame, time int, float  video frames only: index from 0 and time in seconds
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from decodet.errors import DecodetError
from decodet.export.onnx import export_onnx
from decodet.inference.graph import DeployModel, as_size, normalization, prepare_model  # noqa: F401
from decodet.inference.inputs import IMAGE_SUFFIXES, ImageItem, iter_images, preprocess, to_uint8_chw  # noqa: F401
from decodet.inference.metadata import parse_metadata
from decodet.runtime.precision import check_precision, torch_runner

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "openvino")
_EXPORTED = (".onnx", ".xml")  # files from `decodet export` (ONNX, OpenVINO IR)


# ----------------------------------------------------------------------------- detector


class Detector:
    """Run a DECO / DECO+ detector on images of any size, mode and kind.

    Args:
        weights: a checkpoint (ours, the authors' ``.pth``, or a run folder), an
            ``nn.Module`` (a copy is used; the caller's module is not changed), or an
            ``.onnx`` file from :func:`~decodet.export.onnx.export_onnx`.
        device: ``"cpu"``, ``"cuda"``, ... (torch device; for ONNX Runtime, ``"cuda"``
            selects its CUDA provider when installed).
        backend: ``"torch"`` or ``"onnxruntime"``; ``None`` picks ONNX Runtime for
            ``.onnx`` files and torch otherwise.  ONNX Runtime with a checkpoint exports
            it first (fp32, dynamic batch) to a temporary file — once per ``Detector``.
        imgsz: ``(height, width)`` or an int for a square; default: the model's evaluation
            size (module docstring).  An ONNX file carries its own (fixed) size.
        score_threshold: detections scoring below it are dropped.  0.25 by default: a
            user-facing cut.  Use 0.0 to get all ``max_det`` (what COCO evaluation wants).
        max_det: at most this many detections per image (top scores over query x class).
        batch_size: images per forward pass when given many (folders, lists).
        threads: ONNX Runtime / OpenVINO inference threads (``None``: their default).
        precision: ``"fp32"``, ``"bf16"`` or ``"int8"`` (``None``: an exported file's own,
            else fp32).  torch: bf16 weights and compute, heads fp32
            (:mod:`decodet.runtime.precision`); int8 is PT2E (:mod:`decodet.runtime.pt2e`).
            onnxruntime: int8 is a QDQ export (:func:`export_onnx`), no bf16.  openvino: bf16 is
            its inference-precision hint, int8 NNCF's ``smoothquant`` scheme (an IR exported
            with ``--int8-scheme full`` runs as written; :mod:`decodet.export.openvino`).
        calib: int8 calibration images (a folder, glob or list of paths); ``None``:
            synthetic noise with a loud warning — fine for speed, not for accuracy.
        compile: torch backend: ``torch.compile`` with weight freezing (first call per input
            shape compiles); with ``precision="int8"`` the PT2E graph is compiled by Inductor,
            otherwise it runs lowered to oneDNN int8 kernels without code generation.
    """

    def __init__(
        self,
        weights: str | os.PathLike | nn.Module,
        device: str | torch.device = "cpu",
        backend: str | None = None,
        imgsz: int | tuple[int, int] | None = None,
        score_threshold: float = 0.25,
        max_det: int = 100,
        batch_size: int = 1,
        threads: int | None = None,
        precision: str | None = None,
        calib: Any = None,
        compile: bool = False,
    ) -> None:
        suffix = Path(weights).suffix.lower() if isinstance(weights, str | os.PathLike) else ""
        is_onnx = suffix == ".onnx"
        backend = backend or {".onnx": "onnxruntime", ".xml": "openvino"}.get(suffix, "torch")
        if backend not in BACKENDS:
            raise DecodetError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if suffix in _EXPORTED and backend == "torch":
            raise DecodetError(f"an exported {suffix} file runs on onnxruntime or openvino, not torch", weights)
        if suffix == ".xml" and backend != "openvino":
            raise DecodetError("an OpenVINO .xml file runs on backend 'openvino'", weights)
        if precision is not None:
            precision = check_precision(precision)
        if compile and backend != "torch":
            raise DecodetError(f"compile=True applies to the torch backend, not {backend!r}")
        if max_det < 1:
            raise DecodetError(f"max_det must be at least 1, got {max_det}")
        self.backend = backend
        self.device = torch.device(device)
        self.score_threshold = float(score_threshold)
        self.batch_size = max(1, int(batch_size))
        self._fixed_batch: int | None = None
        self.precision = precision or "fp32"
        if backend == "torch":
            model = prepare_model(weights)
            self.config = model.config
            self.imgsz = as_size(imgsz, self.config)
            self.max_det = int(max_det)
            self.mean, self.std = normalization(self.config)
            norm = (self.mean, self.std)
            runner = torch_runner(model, self.max_det, self.precision, compile, calib, self.imgsz, norm)
            self._model = runner.to(self.device).eval()
        elif backend == "openvino":
            from decodet.runtime.openvino import OvModel

            self._ort = OvModel(weights, precision, threads, str(self.device), imgsz, max_det, calib)
            self._use_exported(self._ort.info, imgsz, weights if suffix in _EXPORTED else None, max_det)
            self.precision = self._ort.info.precision
        else:
            self._init_onnx(weights, is_onnx, imgsz, int(max_det), threads, precision, calib)
        self.class_names = _id_to_name(self.config)

    def _init_onnx(
        self, weights: Any, is_onnx: bool, imgsz: Any, max_det: int, threads: int | None, precision: Any, calib: Any
    ) -> None:
        from decodet.inference.ort import OrtModel

        if precision == "bf16":
            raise DecodetError(
                "ONNX Runtime has no bf16 convolution kernels; use backend 'torch' or 'openvino' for bf16"
            )
        if is_onnx:
            self._ort = OrtModel(weights, threads=threads, device=str(self.device))
            info = parse_metadata(self._ort.metadata, weights)
            if precision is not None and precision != info.precision:
                raise DecodetError(
                    f"this ONNX file is {info.precision}; export it with --precision {precision} for that", weights
                )
        else:
            with tempfile.TemporaryDirectory(prefix="decodet-ort-") as tmp:
                log.info("exporting the model to ONNX for the onnxruntime backend (once)")
                path = export_onnx(
                    weights,
                    Path(tmp) / "model.onnx",
                    imgsz=imgsz,
                    dynamic_batch=True,
                    num_top=max_det,
                    precision=precision or "fp32",
                    calib_images=calib,
                )
                self._ort = OrtModel(path, threads=threads, device=str(self.device))  # the session keeps the graph
            info = parse_metadata(self._ort.metadata, path)
        self._use_exported(info, imgsz, weights if is_onnx else None, max_det)
        self.precision = info.precision

    def _use_exported(self, info: Any, imgsz: Any, path: Any, max_det: int) -> None:
        """Size, normalisation, K and batch axis from an exported graph's metadata."""
        if path is not None and imgsz is not None and as_size(imgsz, info.config) != tuple(info.imgsz):
            raise DecodetError(
                f"this file was exported at {info.imgsz[0]}x{info.imgsz[1]}; re-export it for "
                f"imgsz {imgsz!r} or leave imgsz unset",
                path,
            )
        self.config = info.config
        self.imgsz = (int(info.imgsz[0]), int(info.imgsz[1]))
        self.mean, self.std = tuple(info.mean), tuple(info.std)
        if max_det > info.num_top:
            log.warning("max_det %d exceeds the %d detections this ONNX file keeps", max_det, info.num_top)
        self.max_det = min(max_det, info.num_top)
        if not info.dynamic_batch:
            batch = self._ort.input_shape("images")[0]
            self._fixed_batch = int(batch) if isinstance(batch, int) else 1

    # -------------------------------------------------------------------------- API

    def __call__(self, source: Any, batch_size: int | None = None) -> list[dict[str, Any]]:
        """Detections for every image of ``source`` (see :func:`iter_images`), as a list
        (one dict per image, module docstring) — even for a single image."""
        return list(self.stream(source, batch_size))

    def stream(self, source: Any, batch_size: int | None = None) -> Iterator[dict[str, Any]]:
        """As ``__call__`` but lazily: images are read, run and yielded ``batch_size`` at a
        time, so memory stays bounded on large folders and long videos.

        ``source`` may also be a video file (its frames are decoded one at a time) or any
        iterable of images (a generator works).  Results for video frames also carry
        ``frame`` (index from 0) and ``time`` (seconds).
        """
        size = int(batch_size or self.batch_size)
        batch: list[tuple[Tensor, tuple[int, int], ImageItem]] = []
        for item in iter_images(source):
            tensor, orig = preprocess(item.image, self.imgsz, self.mean, self.std)
            batch.append((tensor, orig, item))
            if len(batch) >= size:
                yield from self._run(batch)
                batch = []
        if batch:
            yield from self._run(batch)

    def predict_batch(self, images: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Raw batched inference: ``images [B, 3, H, W]`` preprocessed at ``imgsz``,
        ``orig_sizes [B, 2]`` (h, w) -> ``boxes [B, K, 4]``, ``scores [B, K]``, ``labels
        [B, K]`` (CPU tensors, K = ``max_det``, no score threshold)."""
        if self.backend == "torch":
            with torch.inference_mode():
                boxes, scores, labels = self._model(images.to(self.device), orig_sizes.to(self.device))
            return boxes.cpu(), scores.cpu(), labels.cpu()
        return self._run_onnx(images, orig_sizes)

    def _run_onnx(self, images: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        step = self._fixed_batch or images.shape[0]
        outs: list[tuple[Tensor, ...]] = []
        for start in range(0, images.shape[0], step):
            x, s = images[start : start + step], orig_sizes[start : start + step]
            n = x.shape[0]
            if n < step:  # a fixed-batch file: pad with copies of the last image
                x = torch.cat([x, x[-1:].expand(step - n, -1, -1, -1)])
                s = torch.cat([s, s[-1:].expand(step - n, -1)])
            res = self._ort(images=x.float().numpy(), orig_sizes=s.float().numpy())
            outs.append(tuple(torch.from_numpy(res[k][:n, : self.max_det]) for k in ("boxes", "scores", "labels")))
        return tuple(torch.cat(parts) for parts in zip(*outs))  # type: ignore[return-value]

    def _run(self, batch: list[tuple[Tensor, tuple[int, int], ImageItem]]) -> Iterator[dict[str, Any]]:
        images = torch.stack([b[0] for b in batch])
        sizes = torch.tensor([b[1] for b in batch], dtype=torch.float32)
        boxes, scores, labels = self.predict_batch(images, sizes)
        for i, (_, orig, item) in enumerate(batch):
            keep = scores[i] >= self.score_threshold
            lab = labels[i][keep].long()
            result = {
                "boxes": boxes[i][keep].float(),
                "scores": scores[i][keep].float(),
                "labels": lab,
                "names": [self.class_names.get(int(v), str(int(v))) for v in lab],
                "path": item.path,
                "orig_size": orig,
            }
            if item.frame is not None:
                result.update(frame=item.frame, time=item.time)
            yield result

    def __repr__(self) -> str:
        return (
            f"Detector({self.config.name}, backend={self.backend}, precision={self.precision}, imgsz={self.imgsz}, "
            f"score_threshold={self.score_threshold}, max_det={self.max_det})"
        )


def _id_to_name(cfg: Any) -> dict[int, str]:
    """Category id -> class name, from ``class_names`` (indexed by logit) and ``category_ids``."""
    names = cfg.class_names
    if not names:
        return {}
    ids = cfg.category_ids if cfg.category_ids is not None else range(len(names))
    return {int(i): str(n) for i, n in zip(ids, names)}
