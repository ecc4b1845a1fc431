"""The detection service as an ASGI app: ``create_app(weights, ...)`` -> FastAPI.

Endpoints::

    POST /v1/detect   an image (raw body or multipart field ``file``) -> detections JSON
                      query: threshold (0..1), max_det (1..the model's max_det)
    GET  /v1/model    preset, classes, input size, backend, limits
    GET  /healthz     liveness: {"status": "ok"}
    GET  /metrics     Prometheus text format (see :mod:`decodet.serve.metrics`)
    GET  /            the web page (decodet.export's web_assets/, on /static/; no external assets)
    GET  /docs        OpenAPI docs (FastAPI)

Every error reaches the client as ``{"error": "<one line>"}`` with its HTTP status, never
as a traceback; the service keeps serving after each.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import time
from typing import Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import nn

from decodet.export.web import PAGE_ASSETS, page_html
from decodet.runtime.detector import Detector
from decodet.runtime.options import RunOptions
from decodet.serve.batcher import Batcher, QueueFull, Stopped
from decodet.serve.config import ServeConfig
from decodet.serve.metrics import ServeMetrics
from decodet.serve.uploads import ApiError, decode_image, image_bytes
from decodet.version import __version__

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/detect", "/v1/model", "/healthz", "/metrics", "/")
_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


class DetectionService:
    """One model (a :class:`Detector`), its batcher and its metrics; the routes call into it."""

    def __init__(self, detector: Detector, config: ServeConfig) -> None:
        self.detector = detector
        self.config = config
        self.metrics = ServeMetrics(config.max_batch)
        pad = config.pad_batch
        if pad is None:  # see ServeConfig.pad_batch
            pad = detector.backend != "onnxruntime" or detector.device.type != "cpu"
        self.batcher = Batcher(
            functools.partial(detector.predict_batch, pad_to=config.max_batch if pad else None),
            max_batch=config.max_batch,
            max_wait_ms=config.max_wait_ms,
            max_queue=config.max_queue,
            on_batch=self.metrics.observe_batch,
            on_depth=self.metrics.queue_depth.set,
        )

    def check_key(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if given is None or not secrets.compare_digest(given.encode(), key.encode()):
            what = "missing" if given is None else "wrong"
            raise ApiError(
                401,
                f"{what} API key: send it as 'X-API-Key: KEY' or 'Authorization: Bearer KEY'",
                {"WWW-Authenticate": "Bearer"},
            )

    def prepare(self, data: bytes) -> tuple[torch.Tensor, tuple[int, int]]:
        """Worker thread: bytes -> (``[3, H, W]`` model input, original (h, w))."""
        return self.detector.prepare(decode_image(data, self.config.max_pixels))

    async def detect(self, request: Request, threshold: float | None, max_det: int | None) -> dict[str, Any]:
        start = time.perf_counter()
        self.check_key(request)
        if self.batcher.depth >= self.config.max_queue:  # refuse before reading and decoding
            raise _queue_full(self.batcher.depth, self.config.max_queue)
        data, _ = await image_bytes(request, self.config.max_upload_bytes)
        tensor, orig = await run_in_threadpool(self.prepare, data)
        decoded = time.perf_counter()
        remaining = self.config.timeout_s - (decoded - start)
        try:
            if remaining <= 0:
                raise TimeoutError
            answer = await self.batcher.submit(tensor, orig, remaining)
        except QueueFull:
            raise _queue_full(self.batcher.depth, self.config.max_queue) from None
        except TimeoutError:
            raise ApiError(504, f"no answer within the request timeout of {self.config.timeout_s:g} s") from None
        except Stopped as exc:
            raise ApiError(503, str(exc), {"Retry-After": "5"}) from None
        thr = self.config.score_threshold if threshold is None else threshold
        found = self.detector.result(answer.boxes, answer.scores, answer.labels, thr, max_det)
        return {
            **{key: value if key == "names" else value.tolist() for key, value in found.items()},
            "image_size": {"height": orig[0], "width": orig[1]},
            "threshold": thr,
            "batch_size": answer.batch_size,
            "timings_ms": {
                "decode": round((decoded - start) * 1000.0, 3),
                "queue": round(answer.queue_ms, 3),
                "inference": round(answer.infer_ms, 3),
                "total": round((time.perf_counter() - start) * 1000.0, 3),
            },
        }

    def model_info(self) -> dict[str, Any]:
        det, cfg = self.detector, self.config
        return {
            "preset": det.config.name,
            "classes": [{"id": i, "name": n} for i, n in sorted(det.class_names.items())],
            "num_classes": int(det.config.num_classes),
            "input_size": {"height": det.imgsz[0], "width": det.imgsz[1]},
            "backend": det.backend,
            "precision": det.precision,
            "device": str(det.device),
            "max_det": det.max_det,
            "threshold": cfg.score_threshold,
            "max_batch": cfg.max_batch,
            "max_wait_ms": cfg.max_wait_ms,
            "max_upload_mb": cfg.max_upload_mb,
            "auth": cfg.api_key is not None,
            "version": __version__,
        }


def _queue_full(depth: int, limit: int) -> ApiError:
    return ApiError(503, f"server busy: {depth} requests waiting (limit {limit}); retry later", {"Retry-After": "1"})


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(
    weights: str | os.PathLike | nn.Module | Detector, config: RunOptions | None = None, **options: Any
) -> FastAPI:
    """The service for ``weights`` (a checkpoint, run folder, ``.onnx`` file, module or
    :class:`Detector`) as a FastAPI app; ``options`` override ``config`` (see
    :class:`ServeConfig`; ``config`` may also be a :class:`RunOptions`).  Serve it with any
    ASGI server, e.g. ``uvicorn.run(app)``; the model is loaded here, the batching loop
    starts with the app (or on its first request when mounted inside another app)."""
    config = ServeConfig.build(config, **options)
    if config.threads is not None:
        torch.set_num_threads(int(config.threads))
    detector = weights if isinstance(weights, Detector) else Detector(weights, options=config)
    service = DetectionService(detector, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batcher.start()
        log.info("serving %r (max batch %d, max wait %g ms)", detector, config.max_batch, config.max_wait_ms)
        yield
        await service.batcher.stop()

    app = FastAPI(
        title="decodet detection service",
        version=__version__,
        description="DECO object detection over HTTP, with dynamic batching.",
        lifespan=lifespan,
    )
    app.state.service = service
    _install_handlers(app, service)

    @app.post("/v1/detect", openapi_extra=_IMAGE_BODY, summary="Detect objects in one image")
    async def detect(
        request: Request,
        threshold: float | None = Query(None, ge=0.0, le=1.0, description="score threshold (default: the server's)"),
        max_det: int | None = Query(None, ge=1, description="at most this many detections"),
    ) -> dict[str, Any]:
        if not service.batcher.running:  # mounted in another app: its lifespan did not run ours
            service.batcher.start()
        return await service.detect(request, threshold, max_det)

    @app.get("/v1/model", summary="The model being served")
    async def model(request: Request) -> dict[str, Any]:
        service.check_key(request)
        return service.model_info()

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "queue_depth": service.batcher.depth}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        service.check_key(request)
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def index(request: Request) -> HTMLResponse:  # the exported page, its detections from this API
        root = request.scope.get("root_path", "").rstrip("/")
        return HTMLResponse(page_html({"source": "api", "root": root}, base=f"{root}/static/"))

    app.mount("/static", StaticFiles(packages=[PAGE_ASSETS]), name="static")
    return app


def _install_handlers(app: FastAPI, service: DetectionService) -> None:
    """JSON errors for everything; request metrics by endpoint and status."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_params(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {e.get('msg')}" for e in exc.errors()]
        return _error(400, "bad request parameters: " + "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s: %s", request.method, request.url.path, exc, exc_info=exc)
        return _error(500, "internal server error (details are in the server log)")

    metrics = service.metrics

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        path, root = request.scope["path"], request.scope.get("root_path", "")
        path = path[len(root) :] if root and path.startswith(root) else path  # mounted under a prefix
        endpoint = path if path in ENDPOINTS else "other"  # bounded label values
        try:
            response = await call_next(request)
        except asyncio.CancelledError:
            raise
        except Exception:
            metrics.observe_request(endpoint, 500, time.perf_counter() - start)
            raise
        metrics.observe_request(endpoint, response.status_code, time.perf_counter() - start)
        return response
