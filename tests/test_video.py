"""Video: `decodet predict` on a synthetic 10-second clip (frames, rate, size, per-frame detections
equal to the Detector's), --stride, frame folders, corrupt and truncated files, lazy
Detector.stream, and the supervision round trip."""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

av = pytest.importorskip("av")

from decodet.cli import main  # noqa: E402
from decodet.errors import DecodetError  # noqa: E402
from decodet.io.checkpoint import save_model  # noqa: E402
from decodet.registry import build_model  # noqa: E402
from decodet.runtime.detector import Detector  # noqa: E402

W, H, FPS, SECONDS = 128, 96, 10, 10
FRAMES = FPS * SECONDS
NAMES = ["box", "bar", "dot"]
IMGSZ = "96"
OPTS = ["--imgsz", IMGSZ, "--threshold", "0.0", "--max-det", "5"]


def make_frame(i: int) -> np.ndarray:
    """A gradient background with two rectangles moving across it (RGB uint8 [H, W, 3])."""
    y, x = np.mgrid[0:H, 0:W]
    img = np.stack([x * 255 // W, y * 255 // H, np.full_like(x, 90)], axis=-1).astype(np.uint8)
    x0 = (i * 3) % (W - 30)
    img[20:50, x0 : x0 + 30] = (230, 40, 40)
    y0 = (i * 2) % (H - 20)
    img[y0 : y0 + 20, W - 40 - x0 // 2 : W - 20 - x0 // 2] = (30, 30, 220)
    return img


def write_video(path: Path, frames: int = FRAMES, fps: int = FPS) -> Path:
    """An H.264 MP4 with its index at the front (so a truncated copy still opens)."""
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for i in range(frames):
            c.mux(s.encode(av.VideoFrame.from_ndarray(make_frame(i), format="rgb24")))
        c.mux(s.encode(None))
    return path


def decode(path: Path) -> tuple[list[np.ndarray], Fraction, tuple[int, int]]:
    """Every frame of ``path`` (RGB), its frame rate and (width, height), straight from PyAV."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        return frames, Fraction(s.average_rate), (s.codec_context.width, s.codec_context.height)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_detections(got: dict, expected: dict, tol: float = 1e-3) -> None:
    """Two JSONL records (or a record and Detector output turned into one) agree."""
    assert got["frame"] == expected["frame"]
    a, b = got["detections"], expected["detections"]
    assert len(a) == len(b) > 0
    for da, db in zip(a, b):
        assert da["category_id"] == db["category_id"] and da["category"] == db["category"]
        assert da["score"] == pytest.approx(db["score"], abs=1e-4)
        assert np.allclose(da["bbox"], db["bbox"], atol=tol, rtol=0)


def as_record(index: int, det: dict) -> dict:
    boxes = det["boxes"].tolist()
    return {
        "frame": index,
        "detections": [
            {"bbox": [x0, y0, x1 - x0, y1 - y0], "score": s, "category_id": int(c), "category": n}
            for (x0, y0, x1, y1), s, c, n in zip(boxes, det["scores"].tolist(), det["labels"].tolist(), det["names"])
        ],
    }


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("deco_tiny", num_classes=3, class_names=NAMES, category_ids=[1, 2, 3]).eval()
    return save_model(model, tmp_path_factory.mktemp("w") / "tiny.safetensors")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4")


@pytest.fixture(scope="module")
def full_run(ckpt, clip, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pred")
    assert main(["predict", str(clip), "--weights", str(ckpt), "--out", str(out), *OPTS]) == 0
    return out


@pytest.mark.slow
def test_predict_video_keeps_frames_rate_size_and_matches_detector(ckpt, clip, full_run):
    frames_in, fps_in, size_in = decode(clip)
    assert len(frames_in) == FRAMES and fps_in == FPS and size_in == (W, H)
    frames_out, fps_out, size_out = decode(full_run / "clip.mp4")
    assert len(frames_out) == FRAMES and fps_out == fps_in and size_out == size_in
    records = read_jsonl(full_run / "clip.jsonl")
    assert [r["frame"] for r in records] == list(range(FRAMES))
    assert np.allclose([r["time"] for r in records], np.arange(FRAMES) / FPS, atol=1e-3)
    # The Detector on the frames decoded from the input file (what predict saw, lossy encoding and all).
    det = Detector(ckpt, imgsz=int(IMGSZ), score_threshold=0.0, max_det=5)
    for i, result in enumerate(det.stream(frames_in)):
        assert_same_detections(records[i], as_record(i, result))
    assert {d["category"] for r in records for d in r["detections"]} <= set(NAMES)
    # Boxes were drawn: the output differs from the input far more than re-encoding alone would.
    diff = [np.abs(a.astype(int) - b.astype(int)).max(axis=-1) for a, b in zip(frames_in, frames_out)]
    assert np.mean([(d > 60).mean() for d in diff]) > 0.005


@pytest.mark.slow
def test_stride_keeps_every_kth_frame(ckpt, clip, full_run, tmp_path):
    out = tmp_path / "s"
    assert main(["predict", str(clip), "--weights", str(ckpt), "--out", str(out), "--stride", "3", *OPTS]) == 0
    records = read_jsonl(out / "clip.jsonl")
    assert [r["frame"] for r in records] == list(range(0, FRAMES, 3))
    full = read_jsonl(full_run / "clip.jsonl")
    for r in records:
        assert_same_detections(r, full[r["frame"]], tol=1e-4)
        assert r["time"] == pytest.approx(r["frame"] / FPS, abs=1e-3)
    frames_out, fps_out, size_out = decode(out / "clip.mp4")
    assert len(frames_out) == len(records) == 34 and fps_out == Fraction(FPS, 3) and size_out == (W, H)


@pytest.mark.slow
def test_folder_of_frames_as_video_and_as_images(ckpt, clip, full_run, tmp_path):
    frames_in, _, _ = decode(clip)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames_in[:12]):
        Image.fromarray(frame).save(folder / f"{i:05d}.png")  # lossless: the same pixels predict saw
    out = tmp_path / "fv"
    argv = ["predict", str(folder), "--weights", str(ckpt), "--out", str(out), "--as-video", "--fps", "5"]
    assert main([*argv, *OPTS]) == 0
    records = read_jsonl(out / "frames.jsonl")
    full = read_jsonl(full_run / "clip.jsonl")
    assert [r["frame"] for r in records] == list(range(12))
    assert [r["time"] for r in records] == pytest.approx([i / 5 for i in range(12)])
    for r in records:
        assert_same_detections(r, full[r["frame"]], tol=1e-4)
    frames_out, fps_out, size_out = decode(out / "frames.mp4")
    assert len(frames_out) == 12 and fps_out == 5 and size_out == (W, H)
    # Without --as-video a folder is still a set of images: drawn images + COCO results, no video.
    out_img = tmp_path / "fi"
    assert main(["predict", str(folder), "--weights", str(ckpt), "--out", str(out_img), *OPTS]) == 0
    assert len(list(out_img.glob("*.jpg"))) == 12 and not list(out_img.glob("*.mp4"))
    assert len(json.loads((out_img / "predictions.json").read_text())) == 12 * 5


def test_frames_of_another_size_and_bad_options(ckpt, tmp_path, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.fromarray(make_frame(0)).save(folder / "000.png")
    Image.fromarray(make_frame(1)[:64]).save(folder / "001.png")
    args = ["predict", str(folder), "--weights", str(ckpt), "--out", str(tmp_path / "o"), *OPTS]
    assert main([*args, "--as-video"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "001.png" in err and "one size" in err
    assert main([*args, "--stride", "2"]) == 2  # stride needs a video
    assert "--stride" in capsys.readouterr().err


def test_corrupt_video_is_a_one_line_error(ckpt, tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert main(["predict", str(bad), "--weights", str(ckpt), "--out", str(tmp_path / "o"), *OPTS]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and "broken.mp4" in captured.err
    assert "Traceback" not in captured.err + captured.out
    with pytest.raises(DecodetError, match="broken.mp4"):
        next(Detector(ckpt, imgsz=int(IMGSZ)).stream(bad))
    text = tmp_path / "notes.mkv"
    text.write_text("not a video at all\n")
    with pytest.raises(DecodetError, match="notes.mkv"):
        next(Detector(ckpt, imgsz=int(IMGSZ)).stream(text))
    assert not (tmp_path / "o").exists()  # nothing written for a file that cannot be read


def test_video_options_and_missing_pyav(ckpt, clip, tmp_path, capsys, monkeypatch):
    args = ["predict", str(clip), "--weights", str(ckpt), "--out", str(tmp_path / "o"), *OPTS]
    assert main([*args, "--fps", "5"]) == 2 and "own rate" in capsys.readouterr().err
    assert main([*args, "--stride", "0"]) == 2 and "stride" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install" in err


@pytest.fixture(scope="module")
def truncated(clip, tmp_path_factory) -> Path:
    data = clip.read_bytes()
    path = tmp_path_factory.mktemp("t") / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.slow
def test_truncated_video_gives_its_frames_and_a_warning(ckpt, truncated, full_run, tmp_path, caplog):
    out = tmp_path / "t"
    with caplog.at_level(logging.WARNING):
        assert main(["predict", str(truncated), "--weights", str(ckpt), "--out", str(out), *OPTS]) == 0
    assert any("truncated" in r.getMessage() and "cut.mp4" in r.getMessage() for r in caplog.records)
    records = read_jsonl(out / "cut.jsonl")
    assert 10 <= len(records) < FRAMES
    assert [r["frame"] for r in records] == list(range(len(records)))
    full = read_jsonl(full_run / "clip.jsonl")
    for r in records:  # the same leading frames decode to the same pixels
        assert_same_detections(r, full[r["frame"]], tol=1e-4)
    assert len(decode(out / "cut.mp4")[0]) == len(records)


def test_stream_is_lazy(ckpt, truncated, caplog):
    det = Detector(ckpt, imgsz=int(IMGSZ), score_threshold=0.0, max_det=5)
    stream = det.stream(truncated)
    assert inspect.isgenerator(stream)
    with caplog.at_level(logging.WARNING):
        first = list(itertools.islice(stream, 3))
        # The warning comes only once the damaged end is reached: 3 results did not decode the file.
        assert not any("truncated" in r.getMessage() for r in caplog.records)
        assert [r["frame"] for r in first] == [0, 1, 2]
        assert [r["time"] for r in first] == pytest.approx([0.0, 0.1, 0.2])
        assert all(r["path"] == str(truncated) and r["orig_size"] == (H, W) for r in first)
        rest = list(stream)
        assert any("truncated" in r.getMessage() for r in caplog.records)
    assert rest and rest[0]["frame"] == 3

    pulled = []

    def frames():
        for i in range(1000):
            pulled.append(i)
            yield make_frame(i)

    lazy = det.stream(frames(), batch_size=2)
    assert len(list(itertools.islice(lazy, 3))) == 3
    assert len(pulled) <= 4  # at most one batch ahead of what was consumed


def test_supervision_round_trip(ckpt, monkeypatch):
    sv = pytest.importorskip("supervision")
    from decodet.predict.interop import from_supervision, to_supervision

    det = Detector(ckpt, imgsz=int(IMGSZ), score_threshold=0.0, max_det=5)
    frame = make_frame(7)
    result = det(frame)[0]
    dets = to_supervision(result)
    assert isinstance(dets, sv.Detections) and len(dets) == 5
    assert np.allclose(dets.xyxy, result["boxes"].numpy()) and np.allclose(dets.confidence, result["scores"].numpy())
    assert dets.class_id.tolist() == result["labels"].tolist()
    assert dets.data["class_name"].tolist() == result["names"]
    back = from_supervision(dets)
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(back[key], result[key]), key
    assert back["names"] == result["names"]
    # supervision's own tools take it: an annotator draws, a filter keeps the layout.
    drawn = sv.BoxAnnotator().annotate(frame.copy(), dets)
    assert drawn.shape == frame.shape and (drawn != frame).any()
    top = from_supervision(dets[dets.confidence >= float(result["scores"][1])])
    assert top["labels"].tolist() == result["labels"][:2].tolist() and top["names"] == result["names"][:2]
    # Ground truth without scores: 1.0; tracker ids come back as track_ids; no class_id: an error.
    box = np.array([[1, 2, 30, 40]], dtype=np.float32)
    gt = sv.Detections(xyxy=box, class_id=np.array([2]), tracker_id=np.array([7]))
    conv = from_supervision(gt, class_names={2: "bar"})
    assert conv["scores"].tolist() == [1.0] and conv["names"] == ["bar"] and conv["track_ids"].tolist() == [7]
    assert to_supervision(conv).tracker_id.tolist() == [7]
    nothing = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0), "names": []}
    empty = to_supervision(nothing)
    assert len(empty) == 0 and len(from_supervision(empty)["boxes"]) == 0
    with pytest.raises(DecodetError, match="class_id"):
        from_supervision(sv.Detections(xyxy=np.array([[0, 0, 5, 5]], dtype=np.float32)))
    monkeypatch.setitem(sys.modules, "supervision", None)  # as if it were not installed
    with pytest.raises(DecodetError, match="pip install"):
        to_supervision(result)
