"""ONNX export: parity with torch (fp32), uneven pooling sizes, dynamic batch, metadata,
int8 / fp16 / bf16, and the ONNX Runtime backend of Detector."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from decodet.errors import DecodetError  # noqa: E402
from decodet.export.onnx import export_onnx  # noqa: E402
from decodet.inference.graph import DeployModel, prepare_model  # noqa: E402
from decodet.inference.metadata import parse_metadata  # noqa: E402
from decodet.inference.ort import OrtModel  # noqa: E402
from decodet.registry import build_model, get_config, list_models  # noqa: E402
from decodet.runtime.detector import Detector  # noqa: E402

SIZE = 128
NAMES = ["cat", "dog", "bird"]
IDS = [1, 5, 7]


def images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth random, normalised-looking inputs [b, 3, h, w]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, max(2, h // 16), max(2, w // 16), generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear")
    return (x - 0.45) / 0.225


def torch_outputs(model, x, sizes, k):
    with torch.no_grad():
        return [t.numpy() for t in DeployModel(prepare_model(model), k)(x, sizes)]


def assert_matched(got: tuple, ref: tuple, tol: float = 1e-4) -> None:
    """One image's detections ``(boxes [K, 4] normalised, scores [K], labels [K])`` equal the
    reference's within ``tol``: sorted scores elementwise, and each detection (label, box)
    found among the reference detections of equal score.

    Random weights give near-tied scores, whose top-k order may legitimately swap between
    two correct implementations; matching within ties keeps the check exact otherwise.
    """
    g_boxes, g_scores, g_labels = (np.asarray(t) for t in got)
    r_boxes, r_scores, r_labels = (np.asarray(t) for t in ref)
    np.testing.assert_allclose(g_scores, r_scores, atol=tol, rtol=0)
    for j in range(len(g_scores)):
        same = (
            (np.abs(r_scores - g_scores[j]) <= tol)
            & (r_labels == g_labels[j])
            & (np.abs(r_boxes - g_boxes[j]).max(axis=1) <= tol)
        )
        assert same.any() or abs(g_scores[j] - r_scores[-1]) <= tol, f"detection {j} has no counterpart"


def assert_parity(ort_out: dict, ref: list, sizes: torch.Tensor, tol: float = 1e-4) -> None:
    """Batched ONNX Runtime outputs == torch's (boxes compared in normalised units)."""
    boxes, scores, labels = ref
    assert ort_out["labels"].dtype == np.int64
    scale = sizes[:, [1, 0, 1, 0]].numpy()[:, None, :]
    for i in range(scores.shape[0]):
        got = (ort_out["boxes"][i] / scale[i], ort_out["scores"][i], ort_out["labels"][i])
        assert_matched(got, (boxes[i] / scale[i], scores[i], labels[i]), tol)


def assert_same_results(a: dict, b: dict, tol: float = 1e-4) -> None:
    """Two Detector results for one image agree (see :func:`assert_matched`)."""
    h, w = a["orig_size"]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    assert_matched((a["boxes"] / scale, a["scores"], a["labels"]), (b["boxes"] / scale, b["scores"], b["labels"]), tol)
    assert a["path"] == b["path"] and a["orig_size"] == b["orig_size"]


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    """deco_tiny with its encoder scores spread out.

    At initialisation DECO+'s dense encoder scores barely depend on the image, so which
    positions the query selection's top-k picks is decided by near-ties that rounding
    (torch vs ONNX Runtime) may flip.  Scaling the encoder's class head makes the selection
    well separated, so detections can be compared one to one.
    """
    torch.manual_seed(0)
    model = build_model("deco_tiny", num_classes=3, class_names=NAMES, category_ids=IDS).eval()
    with torch.no_grad():
        model.decoder.enc_score_head.weight.mul_(50.0)
    return model


@pytest.fixture(scope="module")
def tiny_onnx(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    return export_onnx(tiny, path, imgsz=SIZE, dynamic_batch=True, num_top=20)


@pytest.mark.slow
def test_fp32_parity_and_dynamic_batch(tiny, tiny_onnx):
    ort_model = OrtModel(tiny_onnx, threads=1)
    assert ort_model.input_names == ["images", "orig_sizes"]
    assert ort_model.output_names == ["boxes", "scores", "labels"]
    for b in (1, 2, 3):
        x = images(b, SIZE, SIZE, seed=b)
        sizes = torch.tensor([[480.0, 640.0], [128.0, 128.0], [37.0, 1001.0]][:b])
        out = ort_model(images=x.numpy(), orig_sizes=sizes.numpy())
        assert out["boxes"].shape == (b, 20, 4) and out["scores"].shape == (b, 20)
        assert set(np.unique(out["labels"])) <= set(IDS)  # category ids mapped inside the graph
        assert_parity(out, torch_outputs(tiny, x, sizes, 20), sizes)


@pytest.mark.slow
def test_metadata_describes_the_model(tiny, tiny_onnx):
    meta = {p.key: p.value for p in onnx.load(str(tiny_onnx)).metadata_props}
    info = parse_metadata(meta, tiny_onnx)
    assert info.config.class_names == NAMES and info.config.category_ids == IDS
    assert info.config.name == "deco_tiny"
    assert info.imgsz == (SIZE, SIZE) and info.num_top == 20 and info.dynamic_batch
    assert info.precision == "fp32" and info.opset >= 17
    assert json.loads(meta["normalize_mean"]) == [0.0, 0.0, 0.0]  # DECO+: RT-DETR's [0, 1] inputs


@pytest.mark.slow
def test_detector_onnxruntime_equals_torch(tiny, tiny_onnx):
    # Smooth (image-like) uint8 inputs: on pixel noise, the random-weight encoder's scores tie
    # within 1e-6 across positions, and rounding differences reorder the query selection.
    imgs = [
        ((images(1, h, w, seed=s)[0] * 0.225 + 0.45).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        for s, (h, w) in enumerate(((90, 120), (64, 200), (150, 80)))
    ]
    ref = Detector(tiny, imgsz=SIZE, score_threshold=0.0, max_det=20)(imgs, batch_size=2)
    for det in (
        Detector(tiny_onnx, score_threshold=0.0, max_det=20),  # backend picked from the suffix
        Detector(tiny, backend="onnxruntime", imgsz=SIZE, score_threshold=0.0, max_det=20),  # exported on the fly
    ):
        assert det.backend == "onnxruntime" and det.imgsz == (SIZE, SIZE)
        got = det(imgs, batch_size=2)
        for a, b in zip(got, ref):
            assert_same_results(a, b)
            names = dict(zip(IDS, NAMES))
            assert a["names"] == [names[int(v)] for v in a["labels"]]
    with pytest.raises(DecodetError, match="exported at 128x128"):
        Detector(tiny_onnx, imgsz=256)


@pytest.mark.slow
def test_uneven_size_static_batch_deco_r18(tmp_path):
    """200x328 -> a 7x11 C5 memory pooled unevenly onto the 10x10 query grid."""
    torch.manual_seed(0)
    model = build_model("deco_r18", num_classes=4).eval()
    with torch.no_grad():
        memory_hw = model.backbone(torch.zeros(1, 3, 200, 328)).shape[-2:]
    assert tuple(memory_hw) == (7, 11)  # neither divides 10: the slicing decomposition is exercised
    path = export_onnx(model, tmp_path / "r18.onnx", imgsz=(200, 328), num_top=30)
    ort_model = OrtModel(path, threads=1)
    assert ort_model.input_shape("images") == [1, 3, 200, 328]
    x = images(1, 200, 328, seed=3)
    sizes = torch.tensor([[400.0, 656.0]])
    assert_parity(ort_model(images=x.numpy(), orig_sizes=sizes.numpy()), torch_outputs(model, x, sizes, 30), sizes)
    # a fixed-batch file still serves any number of images through Detector
    imgs = [np.full((50 + 10 * i, 80, 3), 40 * i, np.uint8) for i in range(3)]
    ref = Detector(model, imgsz=(200, 328), score_threshold=0.0, max_det=30)(imgs)
    got = Detector(path, score_threshold=0.0, max_det=30)(imgs, batch_size=2)
    for a, b in zip(got, ref):
        assert_same_results(a, b)


@pytest.mark.slow
def test_int8_quantises_convs_and_keeps_postprocessing_float(tiny, tiny_onnx, tmp_path):
    """Random weights make detection-level agreement meaningless (DECO+ picks its queries
    among near-tied scores, so tiny errors change which queries win).  What is checked:
    the graph is quantised where it should be and nowhere else, it runs, and its score
    distribution stays within 0.02 of fp32's (a broken calibration saturates or flattens it)."""
    calib = [np.random.default_rng(i).integers(0, 255, (96, 128, 3), dtype=np.uint8) for i in range(4)]
    from decodet.export.quantize import Int8Options

    path = export_onnx(
        tiny, tmp_path / "int8.onnx", imgsz=SIZE, precision="int8", calib_images=calib, num_top=20, dynamic_batch=True,
        int8=Int8Options(exclude=None),  # everything int8 here; the sweep's exclusions: tests/test_quantize.py
    )  # fmt: skip
    graph = onnx.load(str(path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    dq_weight = [n for n in convs if producers.get(n.input[1]) and producers[n.input[1]].op_type == "DequantizeLinear"]
    assert convs and len(dq_weight) == len(convs), "every Conv weight must be int8 (QDQ)"
    topk = [n for n in graph.node if n.op_type == "TopK"]
    assert topk and all(producers[n.input[0]].op_type != "DequantizeLinear" for n in topk)
    info = parse_metadata({p.key: p.value for p in onnx.load(str(path)).metadata_props})
    assert info.precision == "int8"

    x = images(2, SIZE, SIZE, seed=7)
    sizes = torch.tensor([[SIZE * 1.0, SIZE * 1.0]] * 2)
    q = OrtModel(path, threads=1)(images=x.numpy(), orig_sizes=sizes.numpy())
    f = OrtModel(tiny_onnx, threads=1)(images=x.numpy(), orig_sizes=sizes.numpy())
    assert q["boxes"].shape == f["boxes"].shape and np.isfinite(q["boxes"]).all()
    assert np.abs(q["scores"] - f["scores"]).max() < 0.02
    assert set(np.unique(q["labels"])) <= set(IDS)


@pytest.mark.slow
def test_fp16_runs_close_to_fp32(tiny, tiny_onnx, tmp_path):
    path = export_onnx(tiny, tmp_path / "fp16.onnx", imgsz=SIZE, precision="fp16", num_top=20, dynamic_batch=True)
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # float32 in and out
    assert any(i.data_type == TensorProto.FLOAT16 for i in graph.initializer)
    x = images(1, SIZE, SIZE, seed=9)
    sizes = torch.tensor([[SIZE * 1.0, SIZE * 1.0]])
    h = OrtModel(path, threads=1)(images=x.numpy(), orig_sizes=sizes.numpy())
    f = OrtModel(tiny_onnx, threads=1)(images=x.numpy(), orig_sizes=sizes.numpy())
    assert h["scores"].dtype == np.float32
    assert np.abs(h["scores"] - f["scores"]).max() < 0.01


@pytest.mark.slow
@pytest.mark.parametrize(("name", "arch"), [("deco_r18", "deco"), ("deco_tiny", "decoplus")])
def test_metadata_inputs_text_agrees_with_mean_std(name, arch, tmp_path):
    """The ``inputs`` text says what the graph takes, as ``normalize_mean``/``normalize_std`` (and
    the web page's model.json) do: DECO ImageNet-normalised, DECO+ plain [0, 1] pixels."""
    from decodet.config import IMAGENET_MEAN, IMAGENET_STD, normalization
    from decodet.export.web import page_config

    assert name in list_models() and get_config(name).arch == arch
    model = build_model(name, num_classes=2, num_decoder_layers=1, query_grid=(4, 4)).eval()  # small for 64x64
    path = export_onnx(model, tmp_path / "m.onnx", imgsz=64, num_top=10)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    mean, std = tuple(json.loads(meta["normalize_mean"])), tuple(json.loads(meta["normalize_std"]))
    assert (mean, std) == normalization(model.config)
    text = meta["inputs"]
    stated = re.search(r"mean \[([^]]*)\], std \[([^]]*)\]", text)
    if arch == "deco":
        assert (mean, std) == (IMAGENET_MEAN, IMAGENET_STD)
        assert "ImageNet-normalised" in text and "[0,1]" not in text
        assert stated, text
        for said, value in zip(stated.groups(), (mean, std)):
            np.testing.assert_allclose([float(v) for v in said.split(",")], value, rtol=1e-6)
    else:
        assert (mean, std) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        assert "scaled to [0,1]" in text and "ImageNet" not in text and not stated
    page = page_config(parse_metadata(meta, path), 0.25)
    assert (tuple(page["mean"]), tuple(page["std"])) == (mean, std)


def test_bf16_and_unknown_precision_are_refused(tmp_path):
    model = build_model("deco_tiny", num_classes=2)
    with pytest.raises(DecodetError, match="bf16"):
        export_onnx(model, tmp_path / "m.onnx", precision="bf16")
    with pytest.raises(DecodetError, match="precision"):
        export_onnx(model, tmp_path / "m.onnx", precision="int4")
    with pytest.raises(DecodetError, match="opset 13"):
        export_onnx(model, tmp_path / "m.onnx", opset=13)
    with pytest.raises(DecodetError, match="at least 32"):
        export_onnx(model, tmp_path / "m.onnx", imgsz=(16, 64))
    assert not (tmp_path / "m.onnx").exists()


def _identity_onnx(path, metadata=None):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    proto = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))
    for k, v in (metadata or {}).items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(path))
    return path


def test_foreign_and_incompatible_onnx_files_are_refused(tmp_path):
    with pytest.raises(DecodetError, match="not an ONNX file exported by decodet"):
        Detector(_identity_onnx(tmp_path / "foreign.onnx"))
    newer = _identity_onnx(tmp_path / "newer.onnx", {"format": "decodet-onnx", "format_version": "99"})
    with pytest.raises(DecodetError, match="format 99"):
        Detector(newer)
    broken = _identity_onnx(tmp_path / "broken.onnx", {"format": "decodet-onnx", "format_version": "1"})
    with pytest.raises(DecodetError, match="incomplete or corrupt"):
        Detector(broken)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not protobuf")
    with pytest.raises(DecodetError, match="junk.onnx"):
        Detector(junk)
    with pytest.raises(DecodetError, match="not found"):
        Detector(tmp_path / "missing.onnx")


def test_an_identical_export_is_copied_not_redone(tiny, tiny_onnx, tmp_path, monkeypatch):
    """The fp32 graph of the same weights and settings is exported once per process
    (export/memo.py); other weights, size or K export afresh."""
    from decodet.export import memo as export_memo
    from decodet.export import onnx as export_module

    calls = []
    real = export_module._torch_export
    monkeypatch.setattr(export_module, "_torch_export", lambda *a, **k: (calls.append(a[2]), real(*a, **k)))
    again = export_onnx(tiny, tmp_path / "again.onnx", imgsz=SIZE, dynamic_batch=True, num_top=20)
    assert calls == [] and again.read_bytes() == tiny_onnx.read_bytes()  # same weights and settings: a copy
    export_onnx(tiny, tmp_path / "k10.onnx", imgsz=SIZE, dynamic_batch=True, num_top=10)
    assert len(calls) == 1  # other K: exported again
    changed = copy.deepcopy(tiny)
    with torch.no_grad():
        changed.decoder.enc_score_head.bias.add_(1.0)
    # other weights, other key (an export of its own would take 15-40 s more)
    assert export_memo.digest(changed, "settings") != export_memo.digest(tiny, "settings")
