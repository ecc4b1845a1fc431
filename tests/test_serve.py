"""The detection service over real HTTP: every endpoint, every bad input, auth, batching.

Servers are real uvicorn servers on free 127.0.0.1 ports (in a thread of this process, or
the ``decodet serve`` command in a subprocess), driven with httpx.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from decodet.cli import main as cli_main
from decodet.runtime.detector import Detector
from decodet.serve import create_app
from serve_support import IDS, NAMES, SIZE, ServerThread, png_bytes, tiny_checkpoint, wait_healthy

REPO = Path(__file__).resolve().parents[1]
LIMIT_MB = 0.25  # upload limit of the main test server
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(ckpt):
    app = create_app(
        ckpt, threshold=0.0, max_det=10, max_batch=4, max_wait_ms=10, max_upload_mb=LIMIT_MB, max_pixels=MAX_PIXELS
    )
    srv = ServerThread(app).start()
    yield srv.url
    srv.stop()


def detect(url: str, data: bytes, params: dict | None = None, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/detect", content=data, params=params, timeout=60, **kw)


def assert_json_error(r: httpx.Response, status: int, *words: str) -> None:
    """A one-line JSON error, no traceback, mentioning ``words``."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in r.text
    for word in words:
        assert word.lower() in body["error"].lower(), body["error"]


def assert_serving(url: str) -> None:
    """The server still answers a good request after a bad one."""
    assert httpx.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
    assert detect(url, png_bytes(40, 50, seed=9)).status_code == 200


def metrics(url: str, **kw) -> dict[tuple[str, tuple], float]:
    """``/metrics`` parsed by prometheus_client's parser: ``(sample name, labels) -> value``."""
    r = httpx.get(f"{url}/metrics", timeout=30, **kw)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# ----------------------------------------------------------------------------- endpoints


def test_health_model_docs_and_page(server):
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok", "queue_depth": 0}
    info = httpx.get(f"{server}/v1/model").json()
    assert info["preset"] == "deco_tiny" and info["backend"] == "torch"
    assert info["classes"] == [{"id": i, "name": n} for i, n in zip(IDS, NAMES)]
    assert info["input_size"] == {"height": SIZE, "width": SIZE}
    assert info["max_det"] == 10 and info["threshold"] == 0.0 and info["auth"] is False
    spec = httpx.get(f"{server}/openapi.json").json()
    assert {"/v1/detect", "/v1/model", "/healthz", "/metrics"} <= set(spec["paths"])
    assert "swagger" in httpx.get(f"{server}/docs").text.lower()
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="canvas"' in page.text and "http://" not in page.text and "https://" not in page.text
    for asset in ("app.js", "style.css"):
        r = httpx.get(f"{server}/static/{asset}")
        assert r.status_code == 200 and "//cdn" not in r.text and "https://" not in r.text


def test_detect_answers_what_detector_answers(server, ckpt):
    data = png_bytes(90, 140, seed=1)
    raw = detect(server, data, headers={"Content-Type": "image/png"}).json()
    form = httpx.post(f"{server}/v1/detect", files={"file": ("a.png", data, "image/png")}, timeout=60).json()
    assert raw["image_size"] == {"height": 90, "width": 140}
    assert {k: raw[k] for k in ("boxes", "scores", "labels", "names")} == {
        k: form[k] for k in ("boxes", "scores", "labels", "names")
    }
    assert len(raw["scores"]) == 10 and set(raw["timings_ms"]) == {"decode", "queue", "inference", "total"}
    ref = Detector(ckpt, score_threshold=0.0, max_det=10)(Image.open(io.BytesIO(data)))[0]
    assert raw["labels"] == ref["labels"].tolist() and raw["names"] == ref["names"]
    # the service pads batches (torch picks kernels by batch size): equal up to float rounding
    assert torch.allclose(torch.tensor(raw["scores"]), ref["scores"], atol=1e-5, rtol=0)
    assert torch.allclose(torch.tensor(raw["boxes"]), ref["boxes"], atol=1e-3, rtol=0)  # pixels


def test_threshold_and_max_det_parameters(server):
    data = png_bytes(64, 64, seed=2)
    full = detect(server, data).json()
    t = full["scores"][3]
    cut = detect(server, data, {"threshold": t}).json()
    keep = [i for i, s in enumerate(full["scores"]) if s >= t]
    assert len(keep) >= 4 and cut["threshold"] == t
    assert cut["scores"] == [full["scores"][i] for i in keep] and cut["labels"] == [full["labels"][i] for i in keep]
    top2 = detect(server, data, {"max_det": 2}).json()
    assert top2["boxes"] == full["boxes"][:2] and top2["scores"] == full["scores"][:2]


def test_metrics_count_requests_batches_and_queue(server):
    before = metrics(server)
    key = ("decodet_requests_total", (("endpoint", "/v1/detect"), ("status", "200")))
    bad = ("decodet_requests_total", (("endpoint", "/v1/detect"), ("status", "415")))
    for i in range(3):
        assert detect(server, png_bytes(32, 48, seed=i)).status_code == 200
    assert detect(server, b"not an image").status_code == 415
    after = metrics(server)
    assert after[key] - before.get(key, 0) == 3 and after[bad] - before.get(bad, 0) == 1
    for name in ("decodet_batch_size_count", "decodet_inference_seconds_count"):  # one forward each
        assert after[(name, ())] - before.get((name, ()), 0) == 3
    assert after[("decodet_queue_depth", ())] == 0
    lat = ("decodet_request_latency_seconds_count", (("endpoint", "/v1/detect"),))
    assert after[lat] - before.get(lat, 0) == 4
    assert any(name == "decodet_request_latency_seconds_bucket" for name, _ in after)


# ----------------------------------------------------------------------------- bad input


def png_declaring(width: int, height: int) -> bytes:
    """A small valid PNG whose header is rewritten to declare ``width x height`` (a bomb's header)."""
    data = bytearray(png_bytes(8, 8))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])  # signature 8, length 4, type 4
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_oversized_uploads_get_413(server):
    big = os.urandom(int(LIMIT_MB * 2**20) + 1000)
    assert_json_error(detect(server, big), 413, "limit")
    form = httpx.post(f"{server}/v1/detect", files={"file": ("big.png", big, "image/png")}, timeout=60)
    assert_json_error(form, 413, "limit")
    chunked = detect(server, iter([big[i : i + 65536] for i in range(0, len(big), 65536)]))  # no Content-Length
    assert_json_error(chunked, 413, "limit")
    assert_serving(server)


def test_bad_images_get_400_or_415(server):
    good = png_bytes(120, 160, seed=3)
    jpeg = png_bytes(120, 160, seed=3, fmt="JPEG")
    corrupt = bytearray(good)
    corrupt[60:200] = bytes(140)  # IDAT bytes overwritten: CRC and zlib stream broken
    cases = [
        (b"hello, I am text", 415, "not an image"),
        (b"", 400, "empty"),
        (good[: len(good) // 2], 400, "truncated"),
        (jpeg[: len(jpeg) // 2], 400, "truncated"),
        (bytes(corrupt), 400, "corrupt"),
    ]
    for data, status, word in cases:
        assert_json_error(detect(server, data), status, word)
    no_file = httpx.post(f"{server}/v1/detect", data={"name": "x"}, files={"other": ("", b"")}, timeout=30)
    assert_json_error(no_file, 400)
    assert_serving(server)


def test_decompression_bombs_get_400_before_decoding(server):
    # a header declaring 2.5 gigapixels over a few bytes of data: refused from the header alone
    # (decoding would have failed differently: "truncated")
    assert_json_error(detect(server, png_declaring(50_000, 50_000)), 400, "megapixels", "before decoding")
    # a real, well-formed PNG that is tiny on the wire and 1.1 megapixels once decoded
    buf = io.BytesIO()
    Image.new("L", (1100, 1000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 20_000
    assert_json_error(detect(server, buf.getvalue()), 400, "megapixels")
    assert_serving(server)


def test_bad_parameters_and_paths_get_json_errors(server):
    data = png_bytes(32, 32)
    assert_json_error(detect(server, data, {"threshold": "high"}), 400, "threshold")
    assert_json_error(detect(server, data, {"threshold": 1.5}), 400, "threshold")
    assert_json_error(detect(server, data, {"max_det": 0}), 400, "max_det")
    assert_json_error(httpx.get(f"{server}/nowhere"), 404)
    assert_json_error(httpx.get(f"{server}/v1/detect"), 405)
    assert_serving(server)


# ----------------------------------------------------------------------------- auth, queue, timeout


def test_api_key(ckpt):
    srv = ServerThread(create_app(ckpt, api_key="s3cret", max_det=5)).start()
    try:
        url, data = srv.url, png_bytes(40, 40)
        assert_json_error(detect(url, data), 401, "missing")
        assert_json_error(detect(url, data, headers={"X-API-Key": "wrong"}), 401, "wrong")
        assert_json_error(detect(url, data, headers={"Authorization": "Bearer s3cre"}), 401, "wrong")
        assert_json_error(httpx.get(f"{url}/v1/model"), 401)
        assert_json_error(httpx.get(f"{url}/metrics"), 401)
        assert detect(url, data, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert detect(url, data, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{url}/v1/model", headers={"X-API-Key": "s3cret"}).json()["auth"] is True
        assert httpx.get(f"{url}/healthz").status_code == 200 and httpx.get(f"{url}/").status_code == 200
        m = metrics(url, headers={"X-API-Key": "s3cret"})
        assert m[("decodet_requests_total", (("endpoint", "/v1/detect"), ("status", "401")))] == 3
    finally:
        srv.stop()


@pytest.mark.slow
def test_full_queue_gets_503_and_slow_answer_504(ckpt):
    # One request admitted: the batch waits 6 s for company, the request times out after 3 s.
    app = create_app(ckpt, max_det=5, max_batch=8, max_wait_ms=6000, max_queue=1, timeout_s=3.0)
    srv = ServerThread(app).start()
    try:
        url, data = srv.url, png_bytes(48, 48)
        first: list[httpx.Response] = []
        t = threading.Thread(target=lambda: first.append(detect(url, data)))
        t.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/healthz").json()["queue_depth"] < 1:
            assert time.monotonic() < deadline and t.is_alive(), "the first request was never queued"
            time.sleep(0.02)
        busy = detect(url, data)
        assert_json_error(busy, 503, "busy")
        assert int(busy.headers["Retry-After"]) >= 1
        t.join(60)
        assert_json_error(first[0], 504, "timeout")
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok", "queue_depth": 0}
        m = metrics(url)
        for status in ("503", "504"):
            assert m[("decodet_requests_total", (("endpoint", "/v1/detect"), ("status", status)))] == 1
        assert m[("decodet_queue_depth", ())] == 0
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- batching


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_batched_answers_equal_single_answers_exactly(ckpt, backend):
    app = create_app(ckpt, backend=backend, threshold=0.0, max_det=10, max_batch=8, max_wait_ms=300)
    srv = ServerThread(app).start()
    fields = ("boxes", "scores", "labels", "names", "image_size")
    try:
        images = [png_bytes(40 + 9 * i, 90 - 5 * i, seed=10 + i) for i in range(8)]
        single = []
        for data in images:  # one at a time: each is alone in its forward pass
            r = detect(srv.url, data).json()
            assert r["batch_size"] == 1
            single.append({k: r[k] for k in fields})
        with httpx.Client(timeout=120) as client, ThreadPoolExecutor(16) as pool:
            post = lambda i: client.post(f"{srv.url}/v1/detect", content=images[i % 8])
            answers = list(pool.map(post, range(16)))
        assert all(r.status_code == 200 for r in answers)
        batched = [r.json() for r in answers]
        assert max(r["batch_size"] for r in batched) > 1, "16 concurrent requests never shared a forward pass"
        for i, r in enumerate(batched):
            assert {k: r[k] for k in fields} == single[i % 8], f"request {i} differs from its single answer"
    finally:
        srv.stop()


def test_app_mounted_in_a_users_server(ckpt):
    """``create_app`` inside another ASGI app (whose lifespan does not start ours)."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    outer = Starlette(
        routes=[
            Route("/healthz", lambda request: PlainTextResponse("ok")),
            Mount("/detector", app=create_app(ckpt, threshold=0.0, max_det=3)),
        ]
    )
    srv = ServerThread(outer).start()
    try:
        r = httpx.post(f"{srv.url}/detector/v1/detect", content=png_bytes(50, 70), timeout=60)
        assert r.status_code == 200 and len(r.json()["boxes"]) == 3
        assert httpx.get(f"{srv.url}/detector/v1/model").json()["max_det"] == 3
        m = metrics(f"{srv.url}/detector")
        assert m[("decodet_requests_total", (("endpoint", "/v1/detect"), ("status", "200")))] == 1
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- the command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_bad_arguments_are_one_line_errors(ckpt, tmp_path, capsys):
    assert cli_main(["serve", "--weights", str(tmp_path / "missing.safetensors"), "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("decodet: error:") and "missing.safetensors" in err and "\n" not in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli_main(["serve", "--weights", str(ckpt), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert "in use" in err and "\n" not in err
    assert cli_main(["serve", "--weights", str(ckpt), "--port", str(_free_port()), "--max-batch", "0"]) == 2
    assert "max_batch" in capsys.readouterr().err


@pytest.mark.slow
def test_decodet_serve_command(ckpt, tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "DECODET_API_KEY": "k"}
    cmd = [sys.executable, "-m", "decodet", "serve", "--weights", str(ckpt), "--port", str(port), "--threshold", "0"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 120, alive=lambda: proc.poll() is None)
        assert detect(url, png_bytes(30, 30)).status_code == 401  # the key came from DECODET_API_KEY
        r = detect(url, png_bytes(30, 60), headers={"X-API-Key": "k"})
        assert r.status_code == 200 and r.json()["image_size"] == {"height": 30, "width": 60}
        assert httpx.get(f"{url}/v1/model", headers={"X-API-Key": "k"}).json()["threshold"] == 0.0
    finally:
        proc.send_signal(2)  # Ctrl-C: uvicorn shuts down gracefully
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"http://127.0.0.1:{port}/" in out and "Traceback" not in out
