"""Helpers for the service tests: a real uvicorn server on a free 127.0.0.1 port, test images."""

from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image

from decodet.io.checkpoint import save_model
from decodet.registry import build_model

NAMES = ["cat", "dog", "bird"]
IDS = [1, 5, 7]
SIZE = 128


def tiny_checkpoint(folder: Path) -> Path:
    """A random-weight ``deco_tiny`` (3 named classes, 128x128 input) saved as safetensors."""
    torch.manual_seed(0)
    model = build_model("deco_tiny", num_classes=3, class_names=NAMES, category_ids=IDS, eval_size=(SIZE, SIZE))
    return save_model(model.eval(), folder / "tiny.safetensors")


def png_bytes(h: int, w: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A smooth random RGB image of ``h x w`` encoded as ``fmt``."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, max(2, h // 8), max(2, w // 8), generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear")[0]
    arr = (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format=fmt)
    return buf.getvalue()


class ServerThread:
    """``uvicorn.Server`` for ``app`` in a background thread, on a socket bound here to a free
    port of 127.0.0.1 (no race for the port); ``url`` once :meth:`start` returns."""

    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 60.0) -> ServerThread:
        self.thread.start()
        wait_healthy(self.url, timeout, alive=self.thread.is_alive)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
        assert not self.thread.is_alive(), "the server did not stop"


def wait_healthy(url: str, timeout: float, alive=lambda: True) -> None:
    """Poll ``url/healthz`` until it answers 200 (or fail after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the server at {url} exited before becoming healthy")
        try:
            if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server at {url} did not become healthy within {timeout:.0f} s")
