"""The served web page in a real headless Chromium: what it draws equals the API's answer.
It is the web export's page (decodet.export's web_assets/) with the API as its source.

Needs Playwright for Python and a Chromium binary (Debian's ``chromium`` package; another
one via ``DECODET_CHROMIUM``).  Skips with the reason when either is missing.  The
screenshot is saved as ``tests/artifacts/serve_page.png``.
"""

from __future__ import annotations

import json
from importlib import resources

import httpx
import pytest

from browser_support import artifact, chromium_context
from decodet.serve import create_app
from serve_support import NAMES, ServerThread, png_bytes, tiny_checkpoint

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    with chromium_context(tmp_path_factory.mktemp("chromium-profile"), viewport={"width": 1200, "height": 800}) as ctx:
        yield ctx


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("serve-browser"))
    srv = ServerThread(create_app(ckpt, threshold=0.0, max_det=10, max_batch=2, max_wait_ms=5)).start()
    yield srv.url
    srv.stop()


def drawn(page) -> list[dict]:
    """The boxes the page drew, from its DOM: one ``li`` per box in ``#detections``."""
    items = page.locator("#detections li")
    out = [
        {
            "label": int(items.nth(i).get_attribute("data-label")),
            "name": items.nth(i).get_attribute("data-name"),
            "box": json.loads(items.nth(i).get_attribute("data-box")),
            "score": float(items.nth(i).get_attribute("data-score")),
        }
        for i in range(items.count())
    ]
    assert int(page.locator("#canvas").get_attribute("data-drawn")) == len(out)
    return out


def as_list(answer: dict) -> list[dict]:
    return [
        {"label": lab, "name": n, "box": b, "score": s}
        for lab, n, b, s in zip(answer["labels"], answer["names"], answer["boxes"], answer["scores"])
    ]


def test_page_draws_the_api_answer(browser_context, server, tmp_path):
    data = png_bytes(240, 320, seed=4)
    image = tmp_path / "street.png"
    image.write_bytes(data)
    page = browser_context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    outside: list[str] = []
    page.on("request", lambda req: None if req.url.startswith(server) else outside.append(req.url))

    page.goto(f"{server}/")
    page.wait_for_function("document.getElementById('model-info').textContent.includes('deco_tiny')")
    # one front-end: the exported page's files, its config pointing at this API
    assert page.evaluate("JSON.parse(document.getElementById('config').textContent)") == {"source": "api", "root": ""}
    assets = resources.files("decodet.export") / "web_assets"
    for name in ("app.js", "style.css", "preprocess.js"):
        assert httpx.get(f"{server}/static/{name}").text == (assets / name).read_text(encoding="utf-8"), name
    assert page.evaluate("window.decodetReady") is True
    page.set_input_files("#file", str(image))
    page.wait_for_selector("#status[data-state='done']", timeout=60_000)

    # at the server's default threshold (the slider's start): everything the API answers
    api = httpx.post(f"{server}/v1/detect", content=data, timeout=60).json()
    assert len(api["boxes"]) == 10
    assert drawn(page) == as_list(api)
    classes = page.locator("#classes li").all()
    counts = {li.get_attribute("data-name"): int(li.get_attribute("data-count")) for li in classes}
    assert counts == {n: api["names"].count(n) for n in set(api["names"])} and set(counts) <= set(NAMES)
    assert "ms" in page.locator("#latency").text_content()
    exposed = page.evaluate("window.lastDetections")
    assert exposed["orig_size"] == [240, 320] and exposed["scores"] == api["scores"]

    # the slider filters on the page, without a new request, exactly as the API's threshold does
    t = api["scores"][3]
    sent: list[str] = []
    page.on("request", lambda req: sent.append(req.url))
    page.eval_on_selector("#threshold", "(el, t) => { el.value = String(t); el.dispatchEvent(new Event('input')); }", t)
    cut = httpx.post(f"{server}/v1/detect", content=data, params={"threshold": t}, timeout=60).json()
    assert 4 <= len(cut["boxes"]) < 10
    assert drawn(page) == as_list(cut)
    assert sent == [], "moving the slider must not send a request"

    shot = artifact("serve_page.png")
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot of the served page: {shot}")
    assert shot.stat().st_size > 10_000
    assert errors == [] and outside == []
    page.close()
