"""``decodet serve``: the HTTP detection service (FastAPI app run by uvicorn)."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import socket

from decodet.cli.options import add_options, options_from
from decodet.errors import DecodetError
from decodet.serve.config import ServeConfig

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
    from decodet.serve.app import create_app

    args.api_key = api_key = args.api_key or os.environ.get("DECODET_API_KEY") or None
    if not _is_loopback(args.host) and api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach it can use it", args.host)
    _check_port(args.host, args.port)
    app = create_app(args.weights, options_from(args, ServeConfig))
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
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--access-log", action="store_true", help="log every request")
    add_options(sv, ServeConfig, skip=("batch_size",))  # --threshold: the default of /v1/detect
    sv.set_defaults(func=_cmd_serve)
