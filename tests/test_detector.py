"""Detector: every input kind, original-image coordinates, batch invariance, bad inputs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from decodet.errors import DecodetError
from decodet.inference import inputs as detector_module
from decodet.inference.graph import DeployModel, normalization, prepare_model
from decodet.io.checkpoint import save_model
from decodet.registry import build_model
from decodet.runtime.detector import Detector, iter_images, preprocess

SIZE = 128
NAMES = ["cat", "dog", "bird"]
IDS = [1, 5, 7]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("deco_tiny", num_classes=3, class_names=NAMES, category_ids=IDS).eval()


@pytest.fixture(scope="module")
def det(model) -> Detector:
    return Detector(model, imgsz=SIZE, score_threshold=0.0, max_det=10)


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (uint8 [h, w, 3])."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, max(2, h // 8), max(2, w // 8), generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear")[0]
    return (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def write_images(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        p = folder / f"img{i:02d}.png"
        Image.fromarray(rgb(h, w, i)).save(p)
        paths.append(p)
    return paths


def assert_same(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert torch.allclose(a["scores"], b["scores"], atol=tol, rtol=0)
    h, w = a["orig_size"]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    assert torch.allclose(a["boxes"] / scale, b["boxes"] / scale, atol=tol, rtol=0)
    assert torch.equal(a["labels"], b["labels"])


def check_result(r: dict, h: int, w: int, k: int = 10) -> None:
    assert r["boxes"].shape == (k, 4) and r["boxes"].dtype == torch.float32
    assert r["scores"].shape == (k,) and r["labels"].dtype == torch.int64
    assert set(r["labels"].tolist()) <= set(IDS)
    assert r["names"] == [NAMES[IDS.index(int(v))] for v in r["labels"]]
    assert r["orig_size"] == (h, w)
    assert bool((r["scores"][:-1] >= r["scores"][1:]).all()), "scores must be sorted"
    b = r["boxes"]
    assert bool((b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all())
    # sigmoid cxcywh can reach half a box past the border, never further
    assert float(b[:, 0::2].min()) >= -0.5 * w and float(b[:, 0::2].max()) <= 1.5 * w
    assert float(b[:, 1::2].min()) >= -0.5 * h and float(b[:, 1::2].max()) <= 1.5 * h


def test_every_input_kind_gives_the_same_detections(det, tmp_path):
    h, w = 70, 150
    arr = rgb(h, w, 3)
    path = tmp_path / "one.png"
    Image.fromarray(arr).save(path)
    chw = torch.from_numpy(arr).permute(2, 0, 1)
    kinds = {
        "path": str(path),
        "pathlib": path,
        "pil": Image.fromarray(arr),
        "numpy": arr,
        "tensor_uint8": chw,
        "tensor_float": chw.float() / 255.0,
        "numpy_float": arr.astype(np.float32) / 255.0,
    }
    results = {name: det(src) for name, src in kinds.items()}
    for name, res in results.items():
        assert len(res) == 1, name
        check_result(res[0], h, w)
        assert_same(res[0], results["numpy"][0])
    assert results["path"][0]["path"] == str(path)
    assert results["pil"][0]["path"] is None


def test_grey_and_palette_and_alpha_images(det):
    h, w = 50, 90
    arr = rgb(h, w, 4)
    grey = Image.fromarray(arr).convert("L")
    for image in (grey, np.asarray(grey), torch.from_numpy(np.asarray(grey).copy())):
        r = det(image)[0]
        check_result(r, h, w)
    # grey as L, as HW array, as [1, H, W] tensor: all the same pixels
    a = det(grey)[0]
    assert_same(a, det(np.asarray(grey))[0])
    assert_same(a, det(torch.from_numpy(np.asarray(grey).copy())[None])[0])
    assert_same(a, det(np.stack([np.asarray(grey)] * 3, -1))[0])
    check_result(det(Image.fromarray(arr).convert("P"))[0], h, w)
    rgba = Image.fromarray(arr).convert("RGBA")
    assert_same(det(rgba)[0], det(arr)[0])  # opaque alpha changes nothing
    assert_same(det(np.asarray(rgba))[0], det(arr)[0])


def test_boxes_are_in_original_image_pixels(model, det):
    h, w = 60, 200
    arr = rgb(h, w, 5)
    r = det(arr)[0]
    # the same forward pass, boxes left normalised (orig size 1 x 1)
    x, orig = preprocess(arr, (SIZE, SIZE), *normalization(model.config))
    assert orig == (h, w)
    with torch.no_grad():
        boxes, scores, labels = DeployModel(prepare_model(model), 10)(x[None], torch.ones(1, 2))
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    torch.testing.assert_close(r["boxes"], boxes[0] * scale, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(r["scores"], scores[0])


def test_batched_equals_one_by_one(det, tmp_path):
    paths = write_images(tmp_path / "imgs", [(64, 64), (100, 40), (33, 250), (128, 96), (77, 77)])
    batched = det(tmp_path / "imgs", batch_size=4)
    single = [det(p, batch_size=1)[0] for p in paths]
    assert [r["path"] for r in batched] == [str(p) for p in paths]
    for a, b in zip(batched, single):
        assert_same(a, b, tol=1e-5)
    # a list of mixed in-memory images, batched
    mixed = det([rgb(64, 64, 0), Image.fromarray(rgb(100, 40, 1))], batch_size=2)
    assert_same(mixed[0], single[0])
    assert_same(mixed[1], single[1])


def test_folder_glob_and_batch_tensor(det, tmp_path):
    paths = write_images(tmp_path / "f", [(40, 60), (60, 40), (50, 50)])
    (tmp_path / "f" / "notes.txt").write_text("not an image")
    by_folder = det(tmp_path / "f")
    assert [r["path"] for r in by_folder] == [str(p) for p in paths]
    by_glob = det(str(tmp_path / "f" / "img0[02].png"))
    assert [r["path"] for r in by_glob] == [str(paths[0]), str(paths[2])]
    stack = torch.stack([torch.from_numpy(rgb(50, 50, i)).permute(2, 0, 1) for i in range(2)])
    assert len(det(stack)) == 2


def test_unreadable_image_in_folder_is_skipped(det, tmp_path, caplog):
    paths = write_images(tmp_path / "f", [(40, 60), (50, 50)])
    bad = tmp_path / "f" / "img01_broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with caplog.at_level(logging.WARNING, logger="decodet.runtime.detector"):
        results = det(tmp_path / "f")
    assert [r["path"] for r in results] == [str(paths[0]), str(paths[1])]
    assert any("img01_broken.jpg" in rec.getMessage() for rec in caplog.records)
    # named explicitly, the same file is an error
    with pytest.raises(DecodetError, match="img01_broken.jpg"):
        det(bad)


def test_empty_folder_and_missing_inputs(det, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DecodetError, match="no image files"):
        det(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"nope")
    with pytest.raises(DecodetError, match="none of the 1 files"):
        det(tmp_path / "junk")
    with pytest.raises(DecodetError, match="not found"):
        det(tmp_path / "missing.jpg")
    with pytest.raises(DecodetError, match="no files match"):
        det(str(tmp_path / "*.jpg"))
    with pytest.raises(DecodetError):
        det(np.zeros((10, 10, 5), np.uint8))
    with pytest.raises(DecodetError, match=r"\[0, 1\]"):
        det(torch.full((3, 8, 8), 2.0))
    with pytest.raises(DecodetError):
        det(12345)


def test_stream_reads_lazily(det, tmp_path, monkeypatch):
    write_images(tmp_path / "f", [(32, 32)] * 5)
    calls = []
    real = detector_module.load_image

    def counting(path, *args, **kwargs):
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(detector_module, "load_image", counting)
    stream = det.stream(tmp_path / "f", batch_size=2)
    first = next(stream)
    assert first["path"].endswith("img00.png")
    assert len(calls) == 2  # one batch read, the rest not yet
    assert len(list(stream)) == 4


def test_score_threshold_and_max_det(model):
    arr = rgb(64, 64, 1)
    all_dets = Detector(model, imgsz=SIZE, score_threshold=0.0, max_det=20)(arr)[0]
    cut = float(all_dets["scores"][5])
    some = Detector(model, imgsz=SIZE, score_threshold=cut, max_det=20)(arr)[0]
    assert len(some["scores"]) >= 6 and bool((some["scores"] >= cut).all())
    assert len(Detector(model, imgsz=SIZE, score_threshold=0.0, max_det=3)(arr)[0]["scores"]) == 3
    assert Detector(model).imgsz == (320, 320)  # DECO+: the config's eval_size


@pytest.mark.parametrize("classes", [["dog"], ["cat", 7], ["5"]])
def test_classes_keep_only_those_detections(model, classes):
    arr = rgb(64, 64, 3)
    everything = Detector(model, imgsz=SIZE, score_threshold=0.0, max_det=300)(arr)[0]
    some = Detector(model, imgsz=SIZE, score_threshold=0.0, max_det=300, classes=classes)(arr)[0]
    ids = {IDS[NAMES.index(c)] if c in NAMES else int(c) for c in classes}
    keep = torch.tensor([int(v) in ids for v in everything["labels"]], dtype=torch.bool)
    assert 0 < int(keep.sum()) < len(keep), "the image should have detections of these classes and others"
    assert torch.equal(some["boxes"], everything["boxes"][keep]) and torch.equal(
        some["scores"], everything["scores"][keep]
    )
    assert some["labels"].tolist() == everything["labels"][keep].tolist()
    assert some["names"] == [n for n, k in zip(everything["names"], keep) if k]
    with pytest.raises(DecodetError, match="unknown classes"):
        Detector(model, imgsz=SIZE, classes=["zebra"])


def test_checkpoint_path_and_model_untouched(model, tmp_path):
    keys = list(model.state_dict())
    det_module = Detector(model, imgsz=SIZE, score_threshold=0.0)
    assert list(model.state_dict()) == keys, "Detector must not re-parameterise the caller's model"
    ckpt = save_model(model, tmp_path / "m.safetensors")
    det_file = Detector(ckpt, imgsz=SIZE, score_threshold=0.0)
    arr = rgb(48, 80, 2)
    assert_same(det_module(arr)[0], det_file(arr)[0])


def test_bad_weights_and_options(tmp_path):
    with pytest.raises(DecodetError, match="not found"):
        Detector(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(DecodetError, match="junk.pth"):
        Detector(junk)
    with pytest.raises(DecodetError, match="backend"):
        Detector(build_model("deco_tiny", num_classes=2), backend="tensorrt")
    with pytest.raises(DecodetError, match="onnxruntime"):
        Detector(tmp_path / "model.onnx", backend="torch")


def test_iter_images_keeps_order_and_paths(tmp_path):
    paths = write_images(tmp_path, [(20, 20), (20, 30)])
    items = list(iter_images([paths[1], rgb(10, 10), paths[0]]))
    assert [i.path for i in items] == [str(paths[1]), None, str(paths[0])]


def test_positional_options_of_earlier_releases_still_work(model):
    """``Detector(w, "cpu", "torch", 128)`` (the order before keyword-only options) warns and
    means the same as the keywords."""
    with pytest.warns(DeprecationWarning, match="keyword-only"):
        old = Detector(model, "cpu", "torch", SIZE)
    new = Detector(model, device="cpu", backend="torch", imgsz=SIZE)
    assert (old.backend, old.imgsz, old.device) == (new.backend, new.imgsz, new.device)
    with pytest.raises(TypeError):
        Detector(model, "cpu", device="cpu")
