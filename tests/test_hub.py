"""Named weights: download, cache, resume, checksums, offline errors — against a local HTTP
server on 127.0.0.1 serving files in the authors' format.  Never the internet."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import decodet
from decodet.cli import main
from decodet.engine.train_config import TrainConfig, resolve
from decodet.errors import DecodetError
from decodet.io import hub
from decodet.io.checkpoint import class_head_keys, load_weights_into

NAME = "decoplus_r18.coco"
FILE = "decoplus_r18_150e.pth"


class FileServer:
    """Serves ``files`` (name -> bytes) over HTTP/1.0 with ``Range: bytes=N-`` support.

    ``cut_next``: the next full (non-Range) response announces the whole length but stops
    after that many bytes and closes — a dropped connection.  ``requests`` records
    ``(path, Range header, body bytes sent)``.
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.cut_next: int | None = None
        self.requests: list[tuple[str, str | None, int]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                if name not in server.files:
                    server.requests.append((name, rng, 0))
                    self.send_error(404)
                    return
                data = server.files[name]
                start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
                if start >= len(data) and rng:
                    server.requests.append((name, rng, 0))
                    self.send_error(416)
                    return
                body = data[start:]
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body)))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not rng and server.cut_next is not None:
                    body, server.cut_next = body[: server.cut_next], None
                self.wfile.write(body)
                server.requests.append((name, rng, len(body)))

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("DECODET_CACHE", str(tmp_path / "cache"))
    yield tmp_path / "cache" / "weights"
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # up to 89 MB: pytest keeps old tmp dirs


def _serve(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes]) -> Iterator[FileServer]:
    server = FileServer(files)
    monkeypatch.setenv("DECODET_HUB", server.url)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def blob() -> bytes:
    """Stand-in file content for the transfer tests (the loader is not involved)."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (3 << 18,), generator=g, dtype=torch.uint8).numpy().tobytes()


@pytest.fixture
def blob_server(monkeypatch: pytest.MonkeyPatch, blob: bytes) -> Iterator[FileServer]:
    yield from _serve(monkeypatch, {FILE: blob})


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- transfer and cache


def test_download_with_progress_then_cache_hit_with_server_stopped(cache, blob, blob_server, capsys):
    path = hub.fetch(NAME, progress=True)
    assert path == cache / FILE and path.read_bytes() == blob
    err = capsys.readouterr().err
    assert FILE in err and "100%" in err  # the tqdm bar reached the end
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [FILE, FILE + ".sha256.json"]
    record = json.loads((cache / (FILE + ".sha256.json")).read_text())
    assert record["sha256"] == hashlib.sha256(blob).hexdigest() and record["size"] == len(blob)
    assert record["url"] == blob_server.url + FILE

    blob_server.stop()
    assert hub.fetch(NAME) == path  # cache hit: no server needed
    assert len(blob_server.requests) == 1
    assert main(["models"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if NAME in ln)
    assert line.split()[-2:] == ["40.7", "yes"]


def test_interrupted_download_resumes_with_range(cache, blob, blob_server):
    blob_server.cut_next = 100_000
    path = hub.fetch(NAME)  # the first response stops at 100 kB; the retry asks for the rest
    assert path.read_bytes() == blob
    assert blob_server.requests == [(FILE, None, 100_000), (FILE, "bytes=100000-", len(blob) - 100_000)]
    assert not (cache / (FILE + ".part")).exists()


def test_interrupted_download_resumes_on_the_next_call(cache, blob, blob_server):
    blob_server.cut_next = 50_000
    with pytest.raises(DecodetError, match=r"interrupted .*run again to resume"):
        hub.download(hub.hub_url(NAME), cache / FILE, attempts=1)
    assert (cache / (FILE + ".part")).stat().st_size == 50_000 and not (cache / FILE).exists()
    assert hub.fetch(NAME).read_bytes() == blob
    assert blob_server.requests[-1] == (FILE, "bytes=50000-", len(blob) - 50_000)


def test_checksum_mismatch_is_refused_and_clearing_it_downloads_again(cache, blob, blob_server):
    path = hub.fetch(NAME)
    damaged = bytearray(blob)
    damaged[1234] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(DecodetError, match="SHA-256") as info:
        decodet.load_model(NAME)
    message = str(info.value)
    assert f"delete {path}" in message and "\n" not in message
    path.unlink()  # as the message says
    (cache / (FILE + ".sha256.json")).unlink()
    assert hub.fetch(NAME).read_bytes() == blob
    assert len(blob_server.requests) == 2


def test_offline_error_says_what_to_download_and_where(cache, monkeypatch, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/mirror/"
    monkeypatch.setenv("DECODET_HUB", url)
    with pytest.raises(DecodetError) as info:
        decodet.load_model(NAME)
    message = str(info.value)
    assert f"cannot download {url}{FILE}" in message and f"by hand and save it as {cache / FILE}" in message
    # the CLI says the same on one line, exit status 2
    assert main(["eval", "--weights", NAME, "--data", "nowhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{url}{FILE}" in err[0] and str(cache / FILE) in err[0]
    assert not (cache / FILE).exists() and not (cache / (FILE + ".part")).exists()


def test_missing_file_on_the_server_and_unknown_names(cache, monkeypatch):
    for _ in _serve(monkeypatch, {}):
        with pytest.raises(DecodetError, match=r"HTTP 404.*by hand"):
            hub.fetch(NAME)
    with pytest.raises(DecodetError, match="decoplus_r18.coco"):  # the valid names are listed
        decodet.load_model("decoplus_r99.coco")


def test_a_file_placed_by_hand_is_used_and_its_checksum_recorded(cache, blob, monkeypatch):
    monkeypatch.setenv("DECODET_HUB", f"http://127.0.0.1:{_closed_port()}/")
    cache.mkdir(parents=True)
    (cache / FILE).write_bytes(blob)
    assert hub.fetch(NAME) == cache / FILE
    record = json.loads((cache / (FILE + ".sha256.json")).read_text())
    assert record["sha256"] == hashlib.sha256(blob).hexdigest() and record["url"] is None


# ----------------------------------------------------------------------------- the authors' files


@pytest.fixture(scope="module")
def authors_r18(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random-weight decoplus_r18 saved as the authors do (EMA weights under ``ema.module``), ~89 MB."""
    torch.manual_seed(0)
    model = decodet.build_model("decoplus_r18", num_classes=80)
    for name, buf in model.named_buffers():  # BN statistics that matter
        if name.endswith("running_var"):
            buf.uniform_(0.5, 2.0)
    state = model.state_dict()
    path = tmp_path_factory.mktemp("authors") / FILE
    torch.save({"ema": {"module": state, "updates": 1000}, "last_epoch": 149}, path)
    return path, state


@pytest.fixture
def authors_server(monkeypatch, authors_r18) -> Iterator[FileServer]:
    yield from _serve(monkeypatch, {FILE: authors_r18[0].read_bytes()})


@pytest.mark.slow
def test_named_weights_load_like_the_file(cache, authors_r18, authors_server):
    by_name = decodet.load_model(NAME)
    by_path = decodet.load_model(authors_r18[0])
    assert by_name.config == by_path.config and by_name.config.name == "decoplus_r18"
    x = torch.rand(1, 3, 160, 160)
    with torch.no_grad():
        a, b = by_name(x), by_path(x)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(a[key], b[key])
    # Detector takes the name too; the second use is a cache hit
    det = decodet.Detector(NAME, imgsz=160, score_threshold=0.0, max_det=5)
    out = det(torch.rand(3, 120, 150))
    assert out[0]["boxes"].shape == (5, 4)
    assert len(authors_server.requests) == 1


@pytest.mark.slow
def test_fine_tuning_from_named_weights_reinitialises_heads_and_picks_the_pretrained_recipe(
    cache, authors_r18, authors_server
):
    model = decodet.build_model("decoplus_r18", num_classes=3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_weights_into(model, NAME)
    heads = set(class_head_keys(model))
    assert set(report["reinitialised"]) == {k for k in heads if fresh[k].shape != authors_r18[1][k].shape}
    assert report["reinitialised"]
    for key, value in model.state_dict().items():
        if key in report["reinitialised"]:
            assert torch.equal(value, fresh[key])
        elif not key.endswith("num_batches_tracked"):
            assert torch.equal(value, authors_r18[1][key]), key

    cfg = resolve(TrainConfig(model="decoplus_r18", weights=NAME))
    scratch = resolve(TrainConfig(model="decoplus_r18"))
    assert (cfg.lr, cfg.lr_backbone, cfg.schedule, cfg.warmup_steps) == (1.5e-4, 1.5e-5, "constant", 0)
    assert (scratch.lr, scratch.schedule) != (cfg.lr, cfg.schedule)


@pytest.mark.slow
def test_fine_tune_in_one_command(tmp_path, cache, authors_server):
    from test_trainer import make_tiny_coco

    data = make_tiny_coco(tmp_path / "data", n_train=2, n_val=1, sizes=((96, 128),))
    argv = ["train", "--model", "decoplus_r18", "--weights", NAME, "--data", str(data), "--max-steps", "1"]
    argv += ["--imgsz", "224", "--batch-size", "2", "--workers", "0", "--project", str(tmp_path / "runs")]
    argv += ["--name", "ft", "--threads", "1", "--no-multiscale"]
    assert main(argv) == 0
    saved = TrainConfig.load(tmp_path / "runs" / "ft" / "train_config.yaml")
    assert (saved.weights, saved.lr, saved.lr_backbone, saved.ema) == (NAME, 1.5e-4, 1.5e-5, True)
    model = decodet.load_model(tmp_path / "runs" / "ft")
    assert model.config.num_classes == 2 and model.config.class_names == ["red", "green"]
    shutil.rmtree(tmp_path / "runs")  # ~0.5 GB of checkpoints and optimizer state
