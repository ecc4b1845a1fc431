"""int8 that keeps accuracy: ONNX Runtime static int8 with a measured per-layer-group sweep
(``export/quantize.py``), PT2E int8 (``runtime/pt2e.py``), and where calibration images come
from (``cli/int8.py``).  All on a deco_tiny trained briefly on a tiny generated dataset.

Tolerance: the model is trained for a few steps only, so its scores are nearly tied and
detection-by-detection agreement is decided by ties (measured: fp32 detections of two
*different* images are as close, by :func:`detection_error`, as fp32 and int8 of one image).
What is checked instead, on the validation images: the sorted top-K scores of int8 stay within
0.01 of fp32's (a broken int8 model, saturated or flattened activations or wrong scales, moves
them by far more), and boxes stay inside the image.  Detection-level agreement and AP are
measured on a longer-trained model by ``decodet benchmark --weights W --data D``.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

from decodet.cli import main  # noqa: E402
from decodet.errors import DecodetError  # noqa: E402
from decodet.export.onnx import export_onnx  # noqa: E402
from decodet.export.quantize import Int8Options, detection_error, layer_groups, quantize_onnx  # noqa: E402
from decodet.inference.calibration import calibration_batches, calibration_source  # noqa: E402
from decodet.inference.ort import OrtModel  # noqa: E402
from decodet.io.checkpoint import load_model  # noqa: E402

SIZE = 96
K = 30
SCORE_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "synth"
    assert main(["data", "synth", str(out), "--train", "8", "--val", "4", "--image-size", "96", "--seed", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    argv = ["train", "--model", "deco_tiny", "--data", str(data), "--imgsz", str(SIZE), "--epochs", "3"]
    argv += ["--batch-size", "4", "--workers", "0", "--threads", "1", "--project", str(runs), "--name", "q"]
    assert main(argv) == 0
    return runs / "q" / "best.safetensors"


@pytest.fixture(scope="module")
def model(trained):
    """The trained model with its encoder scores spread out: after a few steps DECO+'s dense
    encoder scores are nearly tied, so which positions the query selection's top-k picks is
    decided by ties that any rounding flips (fp32 ONNX vs torch included); scaling the
    encoder's class head makes the selection well separated (as in test_export.py)."""
    net = load_model(trained).eval()
    with torch.no_grad():
        net.decoder.enc_score_head.weight.mul_(50.0)
    return net


@pytest.fixture(scope="module")
def fp32_onnx(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("fp32") / "m.onnx", imgsz=SIZE, num_top=K, dynamic_batch=True)


def _feeds(data, split="val"):
    return list(calibration_batches(str(data / split), (SIZE, SIZE), 8, 2))


def _score_gap(path_a, path_b, feeds) -> float:
    """Largest difference of the sorted top-K scores of two ONNX files (boxes checked finite
    and inside the image on the way)."""
    a, b = OrtModel(path_a, threads=1), OrtModel(path_b, threads=1)
    gap = 0.0
    for f in feeds:
        ra, rb = a(f), b(f)
        assert np.isfinite(rb["boxes"]).all() and rb["boxes"].min() >= 0 and rb["boxes"].max() <= SIZE
        gap = max(gap, float(np.abs(ra["scores"] - rb["scores"]).max()))
    return gap


def _float_weight_nodes(path) -> set[str]:
    """Conv/MatMul/Gemm nodes whose weight is *not* dequantised int8."""
    graph = onnx.load(str(path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    out = set()
    for n in graph.node:
        if n.op_type in ("Conv", "MatMul", "Gemm") and len(n.input) > 1:
            p = producers.get(n.input[1])
            if p is None or p.op_type != "DequantizeLinear":
                out.add(n.name)
    return out


def test_detection_error_scale():
    boxes = np.array([[[0, 0, 10, 10], [20, 20, 40, 40]]], dtype=np.float32)
    ref = {"boxes": boxes, "scores": np.array([[0.9, 0.5]], np.float32), "labels": np.array([[1, 2]])}
    assert detection_error(ref, ref) == pytest.approx(0.0, abs=1e-9)
    moved = dict(ref, boxes=boxes + np.array([5, 0, 5, 0], dtype=np.float32))
    assert 0.2 < detection_error(ref, moved) < 0.6  # IoU 1/3 on both boxes
    relabelled = dict(ref, labels=np.array([[3, 4]]))
    assert detection_error(ref, relabelled) == pytest.approx(1.0)


@pytest.mark.slow
def test_int8_sweep_keeps_the_worst_groups_fp32_and_matches_fp32(model, data, fp32_onnx, tmp_path):
    report = tmp_path / "sweep.md"
    path = export_onnx(
        model, tmp_path / "int8.onnx", imgsz=SIZE, num_top=K, dynamic_batch=True, precision="int8",
        calib_images=str(data / "train"), calib_count=4, sensitivity_report=report,
    )  # fmt: skip
    groups = layer_groups(onnx.load(str(fp32_onnx)))
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    excluded = json.loads(meta["int8_excluded_groups"])
    assert set(excluded) <= set(groups) and len(excluded) <= Int8Options().max_excluded
    assert meta["int8_activation"] == "uint8" and meta["int8_calibration"] == "minmax"
    assert "top 3 groups" in meta["int8_selection"]
    # the kept groups' nodes (and only those) have float weights
    assert _float_weight_nodes(path) == set(json.loads(meta["int8_excluded_nodes"]))
    assert set(json.loads(meta["int8_excluded_nodes"])) == {n for g in excluded for n in groups[g]}
    # the report: Markdown table and CSV with one row per layer group
    text = report.read_text()
    assert "int8 sensitivity sweep" in text and all(g in text for g in groups)
    csv_rows = report.with_suffix(".csv").read_text().strip().splitlines()
    assert csv_rows[0] == "group,nodes,harm,score,kept_fp32" and len(csv_rows) == len(groups) + 1
    assert sum(int(r.rsplit(",", 1)[1]) for r in csv_rows[1:]) == len(excluded)
    sweep = json.loads(meta["int8_sweep"])
    assert sweep["final"] <= sweep["full"] + 1e-9  # keeping the worst groups never hurts on the sweep images
    assert _score_gap(fp32_onnx, path, _feeds(data)) < SCORE_TOLERANCE


@pytest.mark.slow
def test_int8_exclusion_choices(model, data, fp32_onnx, tmp_path, monkeypatch):
    calib = str(data / "train")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # quantising writes nothing into the current folder (ORT's shape inference can)
    every = export_onnx(
        model, tmp_path / "all.onnx", imgsz=SIZE, num_top=K, dynamic_batch=True, precision="int8", calib_images=calib,
        calib_count=4, int8=Int8Options(exclude=None, calibrate="percentile", activation="int8"),
    )  # fmt: skip
    assert _float_weight_nodes(every) == set()
    assert _score_gap(fp32_onnx, every, _feeds(data)) < SCORE_TOLERANCE
    meta = {p.key: p.value for p in onnx.load(str(every)).metadata_props}
    assert meta["int8_calibration"] == "percentile" and meta["int8_activation"] == "int8"
    groups = layer_groups(onnx.load(str(fp32_onnx)))
    head = next(g for g in groups if "score_head" in g)
    given = export_onnx(
        model, tmp_path / "given.onnx", imgsz=SIZE, num_top=K, dynamic_batch=True, precision="int8", calib_images=calib,
        calib_count=4, int8=Int8Options(exclude=[head]),
    )  # fmt: skip
    assert _float_weight_nodes(given) == set(groups[head])
    with pytest.raises(DecodetError, match="unknown layer group"):  # before calibrating: no feeds needed
        quantize_onnx(fp32_onnx, tmp_path / "bad.onnx", [{}], Int8Options(exclude=["model.no_such_layer"]))
    assert sorted(p.name for p in cwd.iterdir()) == []


def test_calibration_defaults(data, model, fp32_onnx, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # no bundled data/synth here
    assert calibration_source("my/folder", str(data)) == "my/folder"
    assert calibration_source(None, str(data)) == str(data / "train")
    assert calibration_source(None, None) is None
    with caplog.at_level(logging.WARNING, logger="decodet.export.onnx"):
        export_onnx(  # the graph of fp32_onnx (export/memo.py copies it): only the int8 step runs
            model, tmp_path / "s.onnx", imgsz=SIZE, num_top=K, dynamic_batch=True, precision="int8",
            calib_count=1, int8=Int8Options(exclude=None),
        )  # fmt: skip
    assert any("SYNTHETIC" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_cli_export_int8_with_data_writes_report(trained, data, tmp_path):
    out = tmp_path / "m_int8.onnx"
    argv = ["export", "--weights", str(trained), "--out", str(out), "--precision", "int8", "--data", str(data)]
    argv += ["--imgsz", str(SIZE), str(SIZE), "--sensitivity-report", "--calib-count", "4", "--sweep-images", "4"]
    assert main(argv) == 0
    report = tmp_path / "m_int8_int8_sensitivity.md"
    assert report.is_file() and "score drop" in report.read_text()  # ranked by val AP with --data
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["int8_calibration_images"] == "4"


def test_pt2e_refuses_too_few_calibration_images(model):
    """PT2E's numerics are checked through Detector(precision="int8") in tests/test_precision.py."""
    pytest.importorskip("torchao")
    from decodet.runtime.pt2e import quantize_pt2e

    with pytest.raises(DecodetError, match="calibration images"):
        quantize_pt2e(model, torch.zeros(3, SIZE, SIZE))
