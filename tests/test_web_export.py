"""`decodet export --format web`: the static folder, its int8 variant, bad inputs, the page's
config (the same page is decodet serve's, see tests/test_serve_browser.py), and — in
headless Chromium, served by a local static server — detections equal to ONNX Runtime in
Python (``Detector(backend="onnxruntime")``) on the same image.

onnxruntime-web comes from npm (``npm pack``, npm's cache first) or ``$DECODET_ORT_WEB``; the
tests skip with the reason when neither is available.  The browser test also skips without
Playwright or Chromium.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from browser_support import artifact, chromium_context

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

from decodet.cli import main  # noqa: E402
from decodet.errors import DecodetError  # noqa: E402
from decodet.export.web import ORT_WEB_FILES, export_web, ort_web_files, page_html  # noqa: E402
from decodet.inference.inputs import preprocess  # noqa: E402
from decodet.io.checkpoint import save_model  # noqa: E402
from decodet.registry import build_model  # noqa: E402
from decodet.runtime.detector import Detector  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZE = 128
NAMES = ["cat", "dog", "bird"]
IDS = [1, 5, 7]


@pytest.fixture(scope="module")
def ort_web(tmp_path_factory) -> Path:
    """A folder with onnxruntime-web's WASM files: ``$DECODET_ORT_WEB`` or ``npm pack``."""
    if os.environ.get("DECODET_ORT_WEB"):
        return Path(os.environ["DECODET_ORT_WEB"])
    try:
        return ort_web_files(cache=tmp_path_factory.mktemp("ortweb") / "files")
    except DecodetError as exc:
        pytest.skip(f"onnxruntime-web not available: {exc}")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("deco_tiny", num_classes=3, class_names=NAMES, category_ids=IDS).eval()
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def web_fp32(weights, ort_web, tmp_path_factory) -> Path:
    return export_web(weights, tmp_path_factory.mktemp("web") / "site", imgsz=SIZE, ort_web=ort_web)


@pytest.mark.slow
def test_web_folder_has_page_model_and_runtime(web_fp32, weights):
    for name in ("index.html", "app.js", "preprocess.js", "style.css", "model.onnx", "model.json"):
        assert (web_fp32 / name).stat().st_size > 0, name
    for name in ORT_WEB_FILES:
        assert (web_fp32 / "ort" / name).stat().st_size > 0, name
    assert (web_fp32 / "ort" / "ort-wasm-simd-threaded.wasm").read_bytes()[:4] == b"\0asm"
    html = (web_fp32 / "index.html").read_text()
    assert 'src="app.js"' in html and "http://" not in html and "https://" not in html  # no CDN
    assert html == page_html({"source": "onnx"})  # the page's own config: model.onnx, in the page
    assert './ort/ort.wasm.min.mjs"' in (web_fp32 / "app.js").read_text()
    meta = json.loads((web_fp32 / "model.json").read_text())
    assert meta["imgsz"] == [SIZE, SIZE] and meta["precision"] == "fp32"
    assert meta["class_names"] == {str(i): n for i, n in zip(IDS, NAMES)}
    det = Detector(web_fp32 / "model.onnx", backend="onnxruntime")
    assert det.imgsz == (SIZE, SIZE) and list(det.mean) == meta["mean"] and list(det.std) == meta["std"]
    assert meta["num_top"] == det.max_det


@pytest.fixture(scope="module")
def web_int8(weights, ort_web, tmp_path_factory) -> Path:
    """The int8 variant, written by the CLI over an earlier (stale) web export."""
    tmp_path = tmp_path_factory.mktemp("web8")
    out = tmp_path / "site8"
    out.mkdir()  # an earlier web export (model.json marks one) is replaced whole
    (out / "model.json").write_text("{}")
    (out / "stale.txt").write_text("old")
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(4):  # a few calibration images keep the test short
        Image.fromarray(scene(96 + 16 * i, 128)).save(calib / f"{i}.png")
    argv = ["export", "--weights", str(weights), "--format", "web", str(out), "--precision", "int8"]
    argv += ["--int8-exclude", "none"]  # no sensitivity sweep: that is tests/test_quantize.py's
    assert main([*argv, "--imgsz", str(SIZE), str(SIZE), "--calib", str(calib), "--ort-web", str(ort_web)]) == 0
    return out


@pytest.mark.slow
def test_int8_variant_and_cli(web_int8):
    out = web_int8
    meta = json.loads((out / "model.json").read_text())
    assert meta["precision"] == "int8"
    proto = onnx.load(str(out / "model.onnx"))
    assert {p.key: p.value for p in proto.metadata_props}["precision"] == "int8"
    assert {p.key: p.value for p in proto.metadata_props}["int8_selection"].startswith("none")  # --int8-exclude
    assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    assert all((out / "ort" / n).is_file() for n in ORT_WEB_FILES)
    res = Detector(out / "model.onnx", score_threshold=0.0)(np.zeros((40, 60, 3), np.uint8))[0]
    assert res["boxes"].shape[1] == 4 and res["orig_size"] == (40, 60)
    assert not (out / "stale.txt").exists()


def test_bad_requests_are_one_line_errors(weights, ort_web, tmp_path, monkeypatch):
    with pytest.raises(DecodetError, match="precision"):
        export_web(weights, tmp_path / "a", precision="fp16", ort_web=ort_web)
    other = tmp_path / "taken"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DecodetError, match="not an earlier web export"):
        export_web(weights, other, ort_web=ort_web)
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(DecodetError, match="not an onnxruntime-web package"):
        export_web(weights, tmp_path / "b", ort_web=tmp_path)
    assert not (tmp_path / "b").exists()
    bad_tgz = tmp_path / "bad.tgz"
    bad_tgz.write_bytes(b"not a tarball")
    with pytest.raises(DecodetError, match="tarball"):
        export_web(weights, tmp_path / "c", ort_web=bad_tgz)
    assert not (tmp_path / "c").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # a machine without npm, nothing cached
    monkeypatch.delenv("DECODET_ORT_WEB", raising=False)
    with pytest.raises(DecodetError, match="npm was not found.*--ort-web"):
        ort_web_files(cache=tmp_path / "cache")


def test_page_html_sets_source_and_base():
    """decodet serve's page: the same index.html, its config naming the API, its files under /static/."""
    html = page_html({"source": "api", "root": "/det", "note": "</script><b>"}, base="/det/static/")
    assert html.count('<base href="/det/static/">') == 1 and html.count("</script>") == 2  # config + app.js
    start = html.index('<script id="config" type="application/json">')
    config = html[html.index(">", start) + 1 : html.index("</script>", start)]
    assert json.loads(config) == {"source": "api", "root": "/det", "note": "</script><b>"}
    assert 'src="app.js"' in html and 'href="style.css"' in html


@pytest.mark.skipif(shutil.which("node") is None, reason="node (Node.js) not installed")
def test_js_preprocessing_equals_detector(tmp_path):
    """preprocess.js under Node gives the tensor Detector's preprocess gives (torchvision's
    uint8 antialiased resize, bit for bit; normalisation to float rounding)."""
    src = REPO / "src" / "decodet" / "export" / "web_assets" / "preprocess.js"
    shutil.copyfile(src, tmp_path / "preprocess.mjs")
    rng = np.random.default_rng(0)
    cases = [(37, 53, 128, 128), (300, 200, 96, 128), (64, 64, 128, 160), (128, 50, 128, 128)]
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    for i, (h, w, _, _) in enumerate(cases):
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8).tofile(tmp_path / f"in{i}.bin")
    script = (
        "import fs from 'fs'; import {toModelInput} from './preprocess.mjs';\n"
        f"const cases = {json.dumps(cases)};\n"
        "cases.forEach(([h, w, oh, ow], i) => {\n"
        "  const rgb = new Uint8Array(fs.readFileSync(`in${i}.bin`));\n"
        f"  const x = toModelInput(rgb, h, w, oh, ow, {mean}, {std});\n"
        "  fs.writeFileSync(`out${i}.bin`, Buffer.from(x.buffer));\n"
        "});\n"
    )
    (tmp_path / "run.mjs").write_text(script)
    subprocess.run(["node", "run.mjs"], cwd=tmp_path, check=True, timeout=60)
    rng = np.random.default_rng(0)
    for i, (h, w, oh, ow) in enumerate(cases):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref, orig = preprocess(image, (oh, ow), tuple(mean), tuple(std))
        got = np.fromfile(tmp_path / f"out{i}.bin", dtype=np.float32).reshape(3, oh, ow)
        assert orig == (h, w)
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- browser


@pytest.fixture
def static_server(request) -> Iterator[str]:
    """``python -m http.server`` for the exported folder (the fixture named by the test's
    ``site`` parameter), on a free port on 127.0.0.1."""
    site = request.getfixturevalue(request.node.callspec.params["site"])

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def browser_page(tmp_path):
    with chromium_context(tmp_path / "profile") as context:
        yield context.new_page()


def scene(h: int, w: int) -> np.ndarray:
    """A generated RGB image (uint8 [h, w, 3]): smooth noise with a few solid rectangles."""
    g = torch.Generator().manual_seed(3)
    low = torch.rand(1, 3, h // 16, w // 16, generator=g)
    x = (torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear")[0] * 255).round().to(torch.uint8)
    image = x.permute(1, 2, 0).numpy().copy()
    image[20:90, 30:120] = (220, 40, 40)
    image[100:170, 150:260] = (40, 200, 60)
    return image


def wait_for(page, expression: str) -> None:
    page.wait_for_function(f"({expression}) || window.decodetError", timeout=120_000)
    error = page.evaluate("window.decodetError")
    assert error is None, f"page error: {error}"


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.parametrize("site", ["web_fp32", "web_int8"])
def test_browser_detections_equal_onnxruntime(site, static_server, browser_page, request, tmp_path):
    folder = request.getfixturevalue(site)
    image_path = tmp_path / "scene.png"
    Image.fromarray(scene(190, 290)).save(image_path)  # not the model's 128x128: the resize is exercised
    det = Detector(folder / "model.onnx", backend="onnxruntime", score_threshold=0.0)
    ref = det(image_path)[0]

    page = browser_page
    page.goto(f"{static_server}/index.html?threshold=0")
    wait_for(page, "window.decodetReady")
    page.set_input_files("#file", str(image_path))
    wait_for(page, "window.lastDetections")
    got = page.evaluate("window.lastDetections")
    assert page.evaluate("JSON.parse(document.getElementById('config').textContent)") == {"source": "onnx"}
    assert page.locator("#detections li").count() == int(page.locator("#canvas").get_attribute("data-drawn"))
    assert page.locator("#detections li").count() == len(got["scores"]) and "ms" in page.inner_text("#latency")

    assert got["orig_size"] == [190, 290]
    boxes, scores = np.array(got["boxes"]), np.array(got["scores"])
    assert len(scores) == len(ref["scores"]) == det.max_det
    np.testing.assert_allclose(scores, ref["scores"].numpy(), atol=1e-3, rtol=0)
    ref_boxes, ref_labels, ref_scores = ref["boxes"].numpy(), ref["labels"].numpy(), ref["scores"].numpy()
    for j in range(len(scores)):  # near-tied scores may swap places: match within 1e-3
        same = (
            (np.abs(ref_scores - scores[j]) <= 1e-3)
            & (ref_labels == got["labels"][j])
            & (np.abs(ref_boxes - boxes[j]).max(axis=1) <= 1.0)
        )
        assert same.any(), f"browser detection {j} ({got['names'][j]}, {scores[j]:.4f}) has no Python counterpart"
    score_gap = np.abs(np.sort(scores) - np.sort(ref_scores)).max()
    assert got["names"] == [dict(zip(IDS, NAMES))[label] for label in got["labels"]]

    # the slider filters client-side, with Detector's rule (score >= threshold); the random
    # model's scores are low, so the cut is taken mid-range (on the slider's 0.01 grid)
    cut = round(float(np.median(ref_scores)), 2)
    page.evaluate(
        f"const s = document.getElementById('threshold'); s.value = '{cut}';"
        "s.dispatchEvent(new Event('input', {bubbles: true}));"
    )
    kept = page.evaluate("window.lastDetections")
    assert kept["threshold"] == pytest.approx(cut) and all(s >= cut for s in kept["scores"])
    assert (ref_scores >= cut + 1e-3).sum() <= len(kept["scores"]) <= (ref_scores >= cut - 1e-3).sum()
    assert 0 < len(kept["scores"]) < len(scores)
    assert page.locator("#detections li").count() == len(kept["scores"])  # one list, drawn and exposed alike
    classes = page.locator("#classes li").all()
    counts = {li.get_attribute("data-name"): int(li.get_attribute("data-count")) for li in classes}
    assert counts == {n: kept["names"].count(n) for n in set(kept["names"])}

    shot = artifact(f"web_export_page_{site.removeprefix('web_')}.png")
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 0
    print(
        f"{site}: browser vs Python ONNX Runtime: max score gap {score_gap:.2e}; screenshot of the exported page "
        f"({len(kept['scores'])} boxes at score >= {cut}): {shot}"
    )
