"""A bounded soak of ``decodet serve``: 16 concurrent clients, 256 requests per backend (torch
fp32, OpenVINO int8), no crash, no error status, and every answer equal to its image's answer
to a single request.

The server is the real ``decodet serve`` command in a subprocess rather than ``create_app`` in a
thread of this process: that is what users run (argument parsing, ``uvicorn.run`` with its own
event loop and signal handling, the model loaded in a fresh process), and a native crash of the
server (the suite once died of a segmentation fault with OpenVINO / torchao and the serving
threads in one process) shows up as the server's exit status plus faulthandler's Python stacks
of every thread in its log: a failed test with the evidence, not a dead pytest.  It costs a
second import of torch and the service: measured on 2 busy cores, the torch server is up in
9-17 s as a command against ~2 s in this process; the OpenVINO int8 server takes 35-90 s to come
up either way (ONNX export, then NNCF calibration), the 256 requests themselves 4-11 s.

Bounded: every request has a timeout, the clients stop at the first failure or at a deadline,
the server must come up within a deadline and is stopped whatever happens (Ctrl-C; if it hangs,
SIGABRT for faulthandler's stacks of every thread, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve_support import png_bytes, tiny_checkpoint, wait_healthy

REPO = Path(__file__).resolve().parents[1]
CLIENTS = 16
PER_CLIENT = 16  # 256 requests per backend
MAX_BATCH = 8
MAX_DET = 10  # random weights score low: threshold 0 and a fixed max_det give 10 detections each
REQUEST_TIMEOUT = 20.0  # seconds, every request; the server answers 504 itself after SERVER_TIMEOUT
SERVER_TIMEOUT = 15.0
STARTUP_TIMEOUT = 240.0  # OpenVINO int8: ONNX export + NNCF calibration, 35-90 s here on 2 busy cores
SOAK_DEADLINE = 120.0  # no client starts a request after this (the soak takes 4-11 s here)
FIELDS = ("boxes", "scores", "labels", "names", "image_size")
# a handful of distinct images, of different sizes (each is resized to the model's 128x128)
IMAGES = [png_bytes(40 + 23 * i, 150 - 19 * i, seed=20 + i) for i in range(5)]

BACKENDS = {
    "torch": [],
    # OpenVINO int8 (NNCF smoothquant) runs a static-shape compilation per batch size, and the service
    # pads every forward to --max-batch anyway.  Measured with Detector.predict_batch (deco_tiny at
    # 128 px, these images and calibration images, 1 and 2 threads): an image's boxes, scores and
    # labels are bitwise equal at batch 1, 2, 4 and 8, in any position and whatever its neighbours
    # (max |difference| 0.0), as for torch: the answers are compared exactly for both backends.
    "openvino-int8": ["--backend", "openvino", "--precision", "int8"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _installed(*modules: str) -> None:
    """Skip unless ``modules`` are installed.  Found, not imported: only the server uses them, and
    importing NNCF into this process would cost seconds and load its native libraries here."""
    for name in modules:
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed")


def _tail(path: Path, lines: int = 60) -> str:
    """The end of the server's log; from faulthandler's report on when there is one (every thread)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    crash = text.find("Fatal Python error")
    return text[crash:][-30_000:] if crash >= 0 else "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def decodet_serve(args: list[str], log: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """``decodet serve ARGS`` on a free port of 127.0.0.1, output to ``log``; ``(process, url)``
    once healthy.  Stopped with Ctrl-C on exit; one that does not stop within 30 s (a hang) gets
    SIGABRT, on which faulthandler writes every thread's stack to ``log``, then SIGKILL."""
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "PYTHONFAULTHANDLER": "1",  # a native crash dumps every thread's Python stack into the log
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "decodet", "serve", "--port", str(port), *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, STARTUP_TIMEOUT, alive=lambda: proc.poll() is None)
        except RuntimeError as exc:
            pytest.fail(f"{exc} (exit status {proc.poll()}); its log:\n{_tail(log)}")
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down gracefully
            for sig in (signal.SIGABRT, signal.SIGKILL):
                try:
                    proc.wait(timeout=30)
                    break
                except subprocess.TimeoutExpired:
                    proc.send_signal(sig)
            proc.wait(timeout=30)


def _answer(r: httpx.Response) -> dict:
    body = r.json()
    return {k: body[k] for k in FIELDS}


def _soak(url: str, refs: list[dict]) -> tuple[list[str], list[int]]:
    """CLIENTS threads with an httpx client each, PER_CLIENT requests each, images in turn (each
    client starting at another image).  Returns (failures, batch sizes of the answers)."""
    failures: list[str] = []
    sizes: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()
    deadline = time.monotonic() + SOAK_DEADLINE

    def fail(message: str) -> None:
        with lock:
            failures.append(message)
        stop.set()

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT) as http:
            for j in range(PER_CLIENT):
                if stop.is_set():
                    return
                if time.monotonic() > deadline:
                    return fail(f"client {c}: soak deadline of {SOAK_DEADLINE:g} s passed after {j} requests")
                k = (c + j) % len(IMAGES)
                try:
                    r = http.post("/v1/detect", content=IMAGES[k], headers={"Content-Type": "image/png"})
                except httpx.HTTPError as exc:
                    return fail(f"client {c} request {j} (image {k}): {type(exc).__name__}: {exc}")
                if r.status_code != 200:
                    return fail(f"client {c} request {j} (image {k}): HTTP {r.status_code} {r.text[:300]}")
                if _answer(r) != refs[k]:
                    return fail(f"client {c} request {j} (image {k}): {_answer(r)} != single answer {refs[k]}")
                with lock:
                    sizes.append(r.json()["batch_size"])

    with ThreadPoolExecutor(CLIENTS, thread_name_prefix="soak-client") as pool:
        for future in [pool.submit(client, c) for c in range(CLIENTS)]:
            future.result()  # a client's own bug (not a failed request) raises here
    return failures, sizes


def _detect_counts(url: str) -> dict[str, float]:
    """``/metrics``: status -> requests of ``/v1/detect``."""
    text = httpx.get(f"{url}/metrics", timeout=REQUEST_TIMEOUT).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "decodet_requests_total" and s.labels["endpoint"] == "/v1/detect":
                out[s.labels["status"]] = s.value
    return out


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_soak_concurrent_clients_get_the_single_request_answers(backend, tmp_path):
    if backend.startswith("openvino"):
        _installed("openvino", "nncf")
    args = ["--weights", str(tiny_checkpoint(tmp_path)), *BACKENDS[backend], "--threads", "1"]
    if "int8" in args:  # calibration images: a folder of a few PNGs (no folder: noise, with a warning)
        calib = tmp_path / "calib"
        calib.mkdir()
        for i in range(4):
            (calib / f"calib{i}.png").write_bytes(png_bytes(96 + 16 * i, 160 - 16 * i, seed=100 + i))
        args += ["--calib", str(calib)]
    args += ["--threshold", "0", "--max-det", str(MAX_DET), "--max-batch", str(MAX_BATCH), "--max-wait-ms", "5"]
    args += ["--timeout-s", str(SERVER_TIMEOUT)]
    log = tmp_path / "serve.log"
    start = time.monotonic()
    with decodet_serve(args, log) as (proc, url):
        up = time.monotonic()
        refs = []
        for data in IMAGES:  # one request per image, alone in its (padded) forward pass
            r = httpx.post(f"{url}/v1/detect", content=data, timeout=REQUEST_TIMEOUT)
            assert r.status_code == 200, r.text
            assert r.json()["batch_size"] == 1 and len(r.json()["boxes"]) == MAX_DET
            refs.append(_answer(r))
        assert len({repr(a) for a in refs}) == len(IMAGES), "distinct images gave identical answers"
        soak_start = time.monotonic()
        failures, sizes = _soak(url, refs)
        done = time.monotonic()
        soak_s = done - soak_start
        assert proc.poll() is None, f"the server exited with status {proc.returncode}; its log:\n{_tail(log)}"
        assert not failures, f"{len(failures)} failed: {failures[:3]}; server log:\n{_tail(log)}"
        n = CLIENTS * PER_CLIENT
        assert len(sizes) == n and max(sizes) > 1, "concurrent requests never shared a forward pass"
        assert _detect_counts(url) == {"200": n + len(IMAGES)}  # no other status, ever
        assert httpx.get(f"{url}/healthz", timeout=REQUEST_TIMEOUT).json() == {"status": "ok", "queue_depth": 0}
    stopped = time.monotonic()
    assert proc.returncode == 0, f"decodet serve ended with status {proc.returncode}; its log:\n{_tail(log)}"
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "Fatal Python error" not in text, _tail(log)
    mean = sum(sizes) / len(sizes)
    print(
        f"\nsoak {backend}: server up in {up - start:.1f} s, {n} requests from {CLIENTS} clients in {soak_s:.1f} s "
        f"({n / soak_s:.0f}/s, mean batch {mean:.1f}, max {max(sizes)}), stopped in {stopped - done:.1f} s, "
        f"total {stopped - start:.1f} s"
    )
