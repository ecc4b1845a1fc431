"""``Detector``: any image in, detections out, on PyTorch, ONNX Runtime or OpenVINO, fp32 / bf16 / int8.

>>> det = Detector("runs/exp/best.safetensors", score_threshold=0.3)
>>> for result in det.stream("photos/", batch_size=8):
...     print(result["path"], result["names"], result["boxes"])

Every image is resized to one fixed ``imgsz`` (aspect ratio not kept), the evaluation transform of the
``light``/``rtdetr`` recipes.  DECO's outputs depend on padding, and a fixed size never needs padding: results
do not depend on the batch an image was in, batches need no size grouping, and the same size exports to ONNX.
The default is the preset's deploy size (:func:`decodet.registry.deploy_imgsz`): DECO+'s ``eval_size`` (its
training size); DECO has none and gets 640x640 (the authors evaluate DECO at short side 800 keeping the aspect
ratio: e.g. ``imgsz=(800, 1216)`` comes close for 2:3 landscape images).

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
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from decodet.errors import DecodetError
from decodet.export.onnx import export_onnx
from decodet.inference.graph import as_size, normalization, prepare_model
from decodet.inference.inputs import ImageItem, iter_images, preprocess
from decodet.inference.metadata import parse_metadata
from decodet.runtime.options import RunOptions
from decodet.runtime.precision import torch_runner

log = logging.getLogger(__name__)

_EXPORTED = (".onnx", ".xml")  # files from `decodet export` (ONNX, OpenVINO IR)


#: the order ``Detector``'s options took positionally before they became keyword-only
_POSITIONAL = ("device", "backend", "imgsz", "score_threshold", "max_det", "batch_size", "threads", "precision",
               "calib_images", "compile")  # fmt: skip


class Detector:
    """Run a DECO / DECO+ detector on images of any size, mode and kind.

    ``weights``: a checkpoint (ours, the authors' ``.pth``, or a run folder), an ``nn.Module`` (a copy is
    used; the caller's is not changed), an ``.onnx`` file from :func:`~decodet.export.onnx.export_onnx` or an
    OpenVINO ``.xml`` from :func:`~decodet.export.openvino.export_openvino`.  How it runs: ``options`` and/or
    :class:`~decodet.runtime.options.RunOptions`' fields as keywords (``backend``, ``precision``, ``imgsz``,
    ``score_threshold``, ``max_det``, ``batch_size``, ``device``, ``threads``, ``calib_images``, ``compile``,
    ...; keywords override ``options``).  ONNX Runtime or OpenVINO with a checkpoint export it first (fp32,
    dynamic batch), once per ``Detector``; an exported file carries its own fixed ``imgsz``, precision, batch."""

    def __init__(
        self, weights: str | os.PathLike | nn.Module, *args: Any, options: RunOptions | None = None, **kwargs: Any
    ) -> None:
        if args:  # the positional order of earlier releases keeps working, with a warning
            if len(args) > len(_POSITIONAL) or set(_POSITIONAL[: len(args)]) & set(kwargs):
                raise TypeError(f"Detector takes weights and then keyword options ({', '.join(_POSITIONAL)})")
            warnings.warn("Detector's options after weights are keyword-only now", DeprecationWarning, stacklevel=2)
            kwargs.update(zip(_POSITIONAL, args))
        o = RunOptions.build(options, **kwargs)
        suffix = Path(weights).suffix.lower() if isinstance(weights, str | os.PathLike) else ""
        backend = o.backend or {".onnx": "onnxruntime", ".xml": "openvino"}.get(suffix, "torch")
        if suffix in _EXPORTED and backend == "torch":
            raise DecodetError(f"an exported {suffix} file runs on onnxruntime or openvino, not torch", weights)
        if suffix == ".xml" and backend != "openvino":
            raise DecodetError("an OpenVINO .xml file runs on backend 'openvino'", weights)
        if o.compile and backend != "torch":
            raise DecodetError(f"compile=True applies to the torch backend, not {backend!r}")
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.backend, self.device = backend, torch.device(auto if o.device == "auto" else o.device)
        self.score_threshold, self.batch_size = float(o.score_threshold), o.batch_size
        self._fixed_batch: int | None = None
        self.precision = o.precision or "fp32"
        if backend == "torch":
            model = prepare_model(weights)
            self.config = model.config
            self.imgsz, self.max_det = as_size(o.imgsz, self.config), o.max_det
            self.mean, self.std = normalization(self.config)
            norm = (self.mean, self.std)
            args = (o.calib_images, self.imgsz, norm, o.calib_count)
            self._model = torch_runner(model, o.max_det, self.precision, o.compile, *args).to(self.device).eval()
        else:
            exported = weights if suffix in _EXPORTED else None
            self._session = self._open_session(weights, exported, o)
            self._use_exported(parse_metadata(self._session.metadata, exported), o.imgsz, exported, o.max_det)
        self.class_names = _id_to_name(self.config)
        ids = {n: i for i, n in self.class_names.items()}
        unknown = [c for c in o.classes or () if c not in ids and not str(c).isdigit()]
        if unknown:
            raise DecodetError(f"unknown classes {unknown}; this model's: {', '.join(ids) or 'ids only'}")
        self.classes = None if o.classes is None else torch.tensor([ids[c] if c in ids else int(c) for c in o.classes])

    def _open_session(self, weights: Any, exported: Any, o: RunOptions) -> Any:
        """The ONNX Runtime session or compiled OpenVINO model that runs ``weights``."""
        if self.backend == "openvino":
            from decodet.runtime.openvino import OvModel

            calib = (o.calib_images, o.calib_count, o.int8_scheme)
            return OvModel(weights, o.precision, o.threads, str(self.device), o.imgsz, o.max_det, *calib)
        from decodet.inference.ort import OrtModel

        if o.precision == "bf16":
            raise DecodetError(
                "ONNX Runtime has no bf16 convolution kernels; use backend 'torch' or 'openvino' for bf16"
            )
        if exported is not None:
            session = OrtModel(weights, threads=o.threads, device=str(self.device))
            info = parse_metadata(session.metadata, weights)
            if o.precision is not None and o.precision != info.precision:
                raise DecodetError(
                    f"this ONNX file is {info.precision}; export it with --precision {o.precision} for that", weights
                )
            return session
        with tempfile.TemporaryDirectory(prefix="decodet-ort-") as tmp:
            log.info("exporting the model to ONNX for the onnxruntime backend (once)")
            path = export_onnx(
                weights, Path(tmp) / "model.onnx", imgsz=o.imgsz, dynamic_batch=True, num_top=o.max_det,
                precision=o.precision or "fp32", calib_images=o.calib_images, calib_count=o.calib_count,
            )  # fmt: skip
            return OrtModel(path, threads=o.threads, device=str(self.device))  # the session keeps the graph

    def _use_exported(self, info: Any, imgsz: Any, path: Any, max_det: int) -> None:
        """Size, normalisation, K, precision and batch axis from an exported graph's metadata."""
        if path is not None and imgsz is not None and as_size(imgsz, info.config) != tuple(info.imgsz):
            raise DecodetError(
                f"this file was exported at {info.imgsz[0]}x{info.imgsz[1]}; re-export it for "
                f"imgsz {imgsz!r} or leave imgsz unset",
                path,
            )
        self.config, self.precision = info.config, info.precision
        self.imgsz = (int(info.imgsz[0]), int(info.imgsz[1]))
        self.mean, self.std = tuple(info.mean), tuple(info.std)
        if max_det > info.num_top:
            log.warning("max_det %d exceeds the %d detections this exported file keeps", max_det, info.num_top)
        self.max_det = min(max_det, info.num_top)
        if not info.dynamic_batch:
            batch = self._session.input_shape("images")[0]
            self._fixed_batch = int(batch) if isinstance(batch, int) else 1

    # -------------------------------------------------------------------------- API

    def __call__(self, source: Any, batch_size: int | None = None) -> list[dict[str, Any]]:
        """Detections for every image of ``source`` (:func:`iter_images`), one dict each, even for one image."""
        return list(self.stream(source, batch_size))

    def stream(self, source: Any, batch_size: int | None = None) -> Iterator[dict[str, Any]]:
        """As ``__call__`` but lazily, ``batch_size`` images at a time, so memory stays bounded on large folders
        and long videos.  ``source`` may also be a video file (frames decoded one at a time) or any iterable of
        images (a generator works); video results also carry ``frame`` (from 0) and ``time`` (seconds)."""
        size = int(batch_size or self.batch_size)
        batch: list[tuple[Tensor, tuple[int, int], ImageItem]] = []
        for item in iter_images(source):
            batch.append((*self.prepare(item.image), item))
            if len(batch) >= size:
                yield from self._run(batch)
                batch = []
        if batch:
            yield from self._run(batch)

    def prepare(self, image: Any) -> tuple[Tensor, tuple[int, int]]:
        """One image (anything :func:`iter_images` yields) -> (``[3, H, W]`` input at ``imgsz``, original (h, w))."""
        return preprocess(image, self.imgsz, self.mean, self.std)

    def predict_batch(
        self, images: Tensor, orig_sizes: Tensor, pad_to: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Raw batched inference: ``images [B, 3, H, W]`` from :meth:`prepare`, ``orig_sizes [B, 2]`` (h, w) ->
        ``boxes [B, K, 4]``, ``scores [B, K]``, ``labels [B, K]`` (CPU, K = ``max_det``, no score threshold).
        ``pad_to``: run at least that many rows (:func:`pad_batch`), so an answer doesn't depend on batch size."""
        n = images.shape[0]
        images, orig_sizes = pad_batch(images, orig_sizes, pad_to or n)
        if self.backend != "torch":
            return tuple(t[:n] for t in self._run_session(images, orig_sizes))  # type: ignore[return-value]
        with torch.inference_mode():
            boxes, scores, labels = self._model(images.to(self.device), orig_sizes.to(self.device))
        return boxes[:n].cpu(), scores[:n].cpu(), labels[:n].cpu()

    def result(
        self, boxes: Tensor, scores: Tensor, labels: Tensor, score_threshold: float | None = None,
        max_det: int | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """One image's row of :meth:`predict_batch` -> its ``boxes``, ``scores``, ``labels`` and ``names``: of
        the best ``max_det`` (at most the detector's), those of ``classes`` scoring >= ``score_threshold``."""
        thr = self.score_threshold if score_threshold is None else score_threshold
        k = self.max_det if max_det is None else min(max_det, self.max_det)
        # float64 comparison: the same test as the web page's slider (JavaScript numbers)
        keep = scores[:k].double() >= thr
        if self.classes is not None:
            keep &= torch.isin(labels[:k].long(), self.classes)
        keep = keep.nonzero().flatten()
        lab = labels[keep].long()
        names = [self.class_names.get(int(v), str(int(v))) for v in lab]
        return {"boxes": boxes[keep].float(), "scores": scores[keep].float(), "labels": lab, "names": names}

    def _run_session(self, images: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """ONNX Runtime / OpenVINO: ``predict_batch``, in calls of the file's batch when fixed."""
        step = self._fixed_batch or images.shape[0]
        outs: list[tuple[Tensor, ...]] = []
        for start in range(0, images.shape[0], step):
            x, s = images[start : start + step], orig_sizes[start : start + step]
            n = x.shape[0]
            x, s = pad_batch(x, s, step)
            res = self._session(images=x.float().numpy(), orig_sizes=s.float().numpy())
            outs.append(tuple(torch.from_numpy(res[k][:n, : self.max_det]) for k in ("boxes", "scores", "labels")))
        return tuple(torch.cat(parts) for parts in zip(*outs))  # type: ignore[return-value]

    def _run(self, batch: list[tuple[Tensor, tuple[int, int], ImageItem]]) -> Iterator[dict[str, Any]]:
        images = torch.stack([b[0] for b in batch])
        sizes = torch.tensor([b[1] for b in batch], dtype=torch.float32)
        boxes, scores, labels = self.predict_batch(images, sizes)
        for i, (_, orig, item) in enumerate(batch):
            result = {**self.result(boxes[i], scores[i], labels[i]), "path": item.path, "orig_size": orig}
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


def pad_batch(images: Tensor, sizes: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``images [B, ...]``, ``sizes [B, 2]`` filled up to ``n`` rows with copies of the last image (compiled
    and fixed-batch runners see one batch size)."""
    extra = n - images.shape[0]
    if extra <= 0:
        return images, sizes
    return torch.cat([images, images[-1:].expand(extra, *images.shape[1:])]), torch.cat(
        [sizes, sizes[-1:].expand(extra, -1)]
    )
