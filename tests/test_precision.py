"""bf16 / int8 / compiled inference: the same detections as eager fp32 within stated margins.

One tiny model is trained once (``trained``, shared with tests/test_openvino.py) so that
scores and boxes mean something.  A detection of fp32's top 5 per image is reproduced in the
other run by a same-label box of IoU >= 0.5 with its score and box corners within the stated
margins (:func:`reproduced`); the bounds hold what a user relies on, on CPUs other than ours:

* bf16 (torch, OpenVINO): 75% reproduced (scores within 0.05, corners within 3% of the side,
  2 px at 64), AP within 5 points of fp32.  bf16 keeps 8 bits of mantissa and this barely
  trained model has near-tied scores, so which ones move depends on the rounding *and* on the
  model, which itself trains to other weights on another CPU's fp32 kernels.  Measured with
  ``benchmarks/precision_spread.py --only bf16`` (training seeds 0-7, 1 and 2 threads, oneDNN
  capped at AVX2 / AVX / SSE41, ATen's portable kernels, autocast's rounding points): reproduced
  0.93-1.00 (a 2-core Zen 4 with native bf16 kernels: 0.88 and 0.90, issue 18), so 0.75 allows
  about twice the worst measured misses (15 of 80).  AP on the 12 validation images: within 0.3
  points over 6 seeds and kernel paths (on the former 4 images one detection moved AP by up to
  10 points under ATen's portable kernels, hence 12).
* int8: 80% reproduced, scores within 0.15, box corners within 10% of the side.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

import decodet
from conftest import shared_dir, shared_lock
from decodet.cli import main
from decodet.errors import DecodetError
from decodet.runtime.detector import Detector
from decodet.runtime.precision import Bf16Model
from test_trainer import TINY, make_tiny_coco

SIZE = 64
TOP = 5
BF16 = {"score": 0.05, "box": 0.03, "matched": 0.75}
BF16_AP_POINTS = 0.05  # |AP bf16 - AP fp32| (module docstring)
INT8 = {"score": 0.15, "box": 0.10, "matched": 0.8}

_CACHE: dict[tuple[int, int], tuple[Path, Path]] = {}
pytestmark = pytest.mark.slow


def train_tiny(root: Path, seed: int = 0, threads: int = 1) -> tuple[Path, Path]:
    """(checkpoint, dataset) of deco_tiny (TINY) trained 150 steps on coloured rectangles; cached
    per session and ``(seed, threads)`` (benchmarks/precision_spread.py varies both)."""
    key = (seed, threads)
    if key not in _CACHE or not _CACHE[key][0].is_file():
        data = make_tiny_coco(root / "data", n_train=8, n_val=12, repeat=8)  # train first: more val, same model
        result = decodet.train(
            model="deco_tiny",
            data=data,
            epochs=100,
            max_steps=150,
            batch_size=4,
            imgsz=SIZE,
            workers=0,
            threads=threads,
            seed=seed,
            lr=2e-3,
            warmup_steps=10,
            schedule="constant",
            eval_every=0,
            plots=False,
            ema=False,
            model_overrides=TINY,
            loss_overrides={"weight_class": 3.0},
            project=root / "runs",
            name="tiny",
        )
        _CACHE[key] = (result.best, data)
    return _CACHE[key]


def trained_once(tmp_path_factory) -> tuple[Path, Path]:
    """:func:`train_tiny` once per test run, whichever test process asks first (test_openvino
    shares it; the others wait for it rather than train their own)."""
    root = shared_dir(tmp_path_factory, "train_tiny")
    with shared_lock(root):
        done = root / "done.txt"
        if done.is_file():
            weights, data = done.read_text().splitlines()
            return Path(weights), Path(data)
        weights, data = train_tiny(root)
        done.write_text(f"{weights}\n{data}\n")
        return weights, data


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    return trained_once(tmp_path_factory)


def val_images(data: Path) -> list[Path]:
    return sorted((data / "val").glob("*.png")) + sorted((data / "train").glob("*.png"))[:4]


def run(det: Detector, images: list[Path]) -> list[dict]:
    return det(images, batch_size=4)


def reproduced(ref: list[dict], got: list[dict], tol: dict) -> float:
    """The fraction of fp32's top-``TOP`` detections per image that ``got`` reproduces: a
    detection of the same label, IoU >= 0.5, score within ``tol["score"]`` and every box
    corner within ``tol["box"]`` of the image side.  (A DETR-style model without NMS often
    has near-duplicates; any one of them may be the match.)"""
    total = hits = 0
    for a, b in zip(ref, got):
        side = float(max(a["orig_size"]))
        for box, score, label in zip(a["boxes"][:TOP], a["scores"][:TOP], a["labels"][:TOP]):
            total += 1
            same = b["labels"] == label
            if not same.any():
                continue
            iou = box_iou(box[None], b["boxes"][same])[0]
            corner = (b["boxes"][same] - box).abs().amax(dim=1)
            near = (b["scores"][same] - score).abs() <= tol["score"]
            hits += bool(((iou >= 0.5) & near & (corner <= tol["box"] * side)).any())
    return hits / total


def assert_close(ref: list[dict], got: list[dict], tol: dict) -> None:
    """At least ``tol["matched"]`` of fp32's top detections are reproduced (:func:`reproduced`)."""
    frac = reproduced(ref, got, tol)
    assert frac >= tol["matched"], f"only {frac:.0%} of fp32's top-{TOP} detections reproduced within {tol}"


@pytest.fixture(scope="module")
def reference(trained) -> list[dict]:
    weights, data = trained
    return run(Detector(weights, score_threshold=0.0, max_det=30), val_images(data))


def test_the_trained_model_detects_something(trained, reference):
    # the comparisons below are only meaningful if fp32 ranks real objects first
    assert max(float(r["scores"][0]) for r in reference) > 0.2
    assert all(bool((r["scores"][:-1] >= r["scores"][1:]).all()) for r in reference)


def test_bf16_runs_in_bf16_and_matches_fp32(trained, reference):
    weights, data = trained
    det = Detector(weights, precision="bf16", score_threshold=0.0, max_det=30)
    inner = det._model.model
    assert isinstance(inner, Bf16Model) and det.precision == "bf16"
    dtypes = {name: p.dtype for name, p in inner.model.named_parameters()}
    assert {d for n, d in dtypes.items() if n.startswith(("backbone.", "encoder."))} == {torch.bfloat16}
    heads = {n: d for n, d in dtypes.items() if "_head" in n and "query_pos" not in n}
    assert heads and set(heads.values()) == {torch.float32}  # class and box heads stay fp32
    assert sum(d == torch.bfloat16 for d in dtypes.values()) > 0.8 * len(dtypes)
    got = run(det, val_images(data))
    assert all(r["boxes"].dtype == torch.float32 and r["scores"].dtype == torch.float32 for r in got)
    assert_close(reference, got, BF16)


def test_onnxruntime_int8_calibrated_on_real_images_matches_fp32(trained, reference):
    weights, data = trained
    det = Detector(
        weights, backend="onnxruntime", precision="int8", calib=data / "train", score_threshold=0.0, max_det=30
    )
    assert det.precision == "int8"
    assert_close(reference, run(det, val_images(data)), INT8)


@pytest.mark.skipif(importlib.util.find_spec("decodet.runtime.pt2e") is None, reason="decodet.runtime.pt2e absent")
def test_torch_pt2e_int8_matches_fp32(trained, reference):
    weights, data = trained
    det = Detector(weights, precision="int8", calib=data / "train", score_threshold=0.0, max_det=30)
    assert_close(reference, run(det, val_images(data)), INT8)


@pytest.mark.skipif(importlib.util.find_spec("decodet.runtime.pt2e") is not None, reason="decodet.runtime.pt2e present")
def test_torch_int8_without_pt2e_is_one_clear_error(trained):
    with pytest.raises(DecodetError, match="int8 on the torch backend needs decodet.runtime.pt2e"):
        Detector(trained[0], precision="int8")


@pytest.mark.skipif(not os.environ.get("DECODET_TEST_COMPILE"), reason="slow Inductor compiles: DECODET_TEST_COMPILE=1")
def test_compiled_fp32_and_bf16_match_eager(trained, reference):
    weights, data = trained
    images = val_images(data)[:4]
    fp32 = run(Detector(weights, compile=True, score_threshold=0.0, max_det=30), images)
    int8 = Detector(weights, precision="int8", calib=data / "train", compile=True, score_threshold=0.0, max_det=30)
    assert_close(reference[:4], run(int8, images), INT8)
    assert_close(reference[:4], fp32, {"score": 1e-3, "box": 1e-3, "matched": 1.0})
    bf16 = run(Detector(weights, precision="bf16", compile=True, score_threshold=0.0, max_det=30), images)
    assert_close(reference[:4], bf16, BF16)


def test_bad_precision_and_backend_combinations_are_refused(trained):
    weights, _ = trained
    with pytest.raises(DecodetError, match="unknown precision 'fp8'"):
        Detector(weights, precision="fp8")
    with pytest.raises(DecodetError, match="no bf16 convolution kernels"):
        Detector(weights, backend="onnxruntime", precision="bf16")
    with pytest.raises(DecodetError, match="compile=True applies to the torch backend"):
        Detector(weights, backend="onnxruntime", compile=True)


def test_eval_and_predict_cli_take_precision(trained, tmp_path):
    weights, data = trained
    base = ["eval", "--weights", str(weights), "--data", str(data), "--imgsz", str(SIZE)]
    assert main([*base, "--out", str(tmp_path / "default")]) == 0
    assert main([*base, "--backend", "torch", "--precision", "fp32", "--out", str(tmp_path / "fp32")]) == 0
    assert main([*base, "--precision", "bf16", "--out", str(tmp_path / "bf16")]) == 0
    stats = {k: json.loads((tmp_path / k / "stats.json").read_text()) for k in ("default", "fp32", "bf16")}
    # the light recipe's square resize is the Detector's: the deployed fp32 run scores the same
    assert stats["fp32"]["AP"] == pytest.approx(stats["default"]["AP"], abs=0.01)
    assert stats["bf16"]["AP"] == pytest.approx(stats["fp32"]["AP"], abs=BF16_AP_POINTS)
    dets = json.loads((tmp_path / "bf16" / "detections.json").read_text())
    assert dets and {d["image_id"] for d in dets} == set(range(10, 22))  # the 12 validation images

    out = tmp_path / "pred"
    args = ["predict", str(data / "val"), "--weights", str(weights), "--precision", "bf16", "--out", str(out)]
    assert main(args) == 0
    assert (out / "predictions.json").is_file() and (out / "000.jpg").is_file()


def test_an_instruction_set_cap_reaches_torchs_kernels():
    """``make test-kernels`` (run by CI) re-runs the numerics-sensitive tests with
    ``ONEDNN_MAX_CPU_ISA`` set below this CPU's best; this checks that the cap really changes the
    convolution kernel torch dispatches to (oneDNN reads it once, at its first call)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "x = torch.randn(2, 64, 56, 56).contiguous(memory_format=torch.channels_last)\n"
        "conv = torch.nn.Conv2d(64, 64, 3).to(memory_format=torch.channels_last)\n"
        "with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON), torch.no_grad():\n"
        "    conv(x)\n"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "SSE41"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    if "onednn_verbose" not in out:
        pytest.skip("this torch build runs the convolution without oneDNN")
    assert "isa:Intel SSE4.1" in out and ",jit:sse41," in out
