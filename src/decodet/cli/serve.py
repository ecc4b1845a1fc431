"""``decodet serve``: the HTTP detection service (FastAPI app run by uvicorn)."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import socket

from decodet.cli.core import add_runtime_args
from decodet.errors import DecodetError

log = logging.getLogger("decodet")


def _check_port(host: str, port: int) -> None:
    """Fail with one line, before loading the model, when the address cannot be bound."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DecodetError(f"cannot resolve host {host!r} ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise DecodetError(f"port {port} on {host} {why}; pick another with --port") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise DecodetError("serving needs fastapi and uvicorn: pip install 'decodet[serve]'") from None
    from decodet.serve import create_app

    api_key = args.api_key or os.environ.get("DECODET_API_KEY") or None
    if not _is_loopback(args.host) and api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach it can use it", args.host)
    _check_port(args.host, args.port)
    app = create_app(
        args.weights,
        backend=args.backend,
        precision=args.precision,
        calib=args.calib,
        compile=args.compile,
        device=args.device,
        imgsz=args.imgsz,
        max_det=args.max_det,
        threads=args.threads,
        threshold=args.threshold,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        timeout_s=args.timeout_s,
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        api_key=api_key,
    )
    print(f"decodet serve: http://{args.host}:{args.port}/ (API docs at /docs; Ctrl-C stops)", flush=True)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="debug" if args.verbose else "info",
        access_log=args.access_log,
        timeout_graceful_shutdown=5,
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``decodet serve``."""
    sv = sub.add_parser("serve", help="HTTP detection service with dynamic batching and a web page")
    sv.add_argument("--weights", required=True, help="checkpoint, run folder, .onnx or OpenVINO .xml file")
    add_runtime_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch", type=int, default=8, help="images per forward pass at most")
    sv.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    sv.add_argument("--threshold", type=float, default=0.3, help="default score threshold of /v1/detect")
    sv.add_argument("--api-key", default=None, help="require this key (or set DECODET_API_KEY)")
    sv.add_argument("--max-upload-mb", type=float, default=10.0, help="larger uploads get 413")
    sv.add_argument("--max-queue", type=int, default=64, help="waiting requests at most; more get 503")
    sv.add_argument("--timeout-s", type=float, default=30.0, help="requests not answered by then get 504")
    sv.add_argument("--max-pixels", type=int, default=40_000_000, help="larger declared images get 400")
    sv.add_argument("--max-det", type=int, default=100)
    sv.add_argument("--imgsz", type=int, default=None, help="inference size (default: the model's)")
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--threads", type=int, default=None, help="inference threads (default: the library's)")
    sv.add_argument("--access-log", action="store_true", help="log every request")
    sv.set_defaults(func=_cmd_serve)
