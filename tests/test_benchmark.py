"""``decodet benchmark``: machine header, own-precision peaks, columns, AP column (no timing
assertions: only structure and arithmetic)."""

from __future__ import annotations

import pytest
import torch

from decodet.bench.benchmark import PEAK_RUNTIME, Row, count_gflops, finish, format_table, run_benchmark
from decodet.cli import main
from decodet.utils.machine import format_header, machine_info, peak_calls


def test_peak_fraction_uses_the_rows_own_precision():
    peaks = [Row(PEAK_RUNTIME, PEAK_RUNTIME, p, gflops=g, median_ms=1000.0, peak_key=p) for p, g in
             (("fp32", 100.0), ("bf16", 200.0), ("int8", 400.0))]  # fmt: skip
    for r in peaks:
        r.extra["best_ms"] = 1000.0  # peaks: 100, 200, 400 GFLOP/s
    base = Row("m", "torch eager", "fp32", median_ms=100.0, gflops=5.0, peak_key="fp32")  # 50 GFLOP/s
    bf16 = Row("m", "torch eager", "bf16", median_ms=50.0, gflops=5.0, peak_key="bf16")  # 100 GFLOP/s
    int8 = Row("m", "onnxruntime", "int8", median_ms=25.0, gflops=5.0, peak_key="int8")  # 200 GFLOP/s
    missing = Row("m", "openvino", "int8", note="not available", gflops=5.0, peak_key="int8")
    finish([*peaks, base, bf16, int8, missing])
    assert base.peak_fraction == pytest.approx(0.5) and base.ratio == pytest.approx(1.0)
    assert bf16.peak_fraction == pytest.approx(0.5) and bf16.ratio == pytest.approx(2.0)
    assert int8.peak_fraction == pytest.approx(0.5) and int8.ratio == pytest.approx(4.0)
    assert missing.peak_fraction is None and missing.ratio is None
    assert [r.extra["peak_gflops"] for r in peaks] == pytest.approx([100.0, 200.0, 400.0])
    table = format_table([*peaks, base, bf16, int8, missing])
    assert "50% (int8)" in table and "4.00x" in table and "not available" in table


def test_machine_header_fields():
    info = machine_info(3)
    assert info["threads"] == 3 and "torch" in info["versions"] and isinstance(info["flags"], list)
    text = format_header(info)
    assert "CPU:" in text and "threads used: 3" in text and f"torch {torch.__version__.split('+')[0]}" in text
    assert "fp32" in peak_calls(64)  # the fp32 peak kernel always runs


@pytest.mark.slow
def test_benchmark_rows_columns_and_ap(tmp_path):
    data = tmp_path / "synth"
    assert main(["data", "synth", str(data), "--train", "2", "--val", "3", "--image-size", "96", "--seed", "4"]) == 0
    from decodet.evaluation.deployed import RunnerEvaluator

    rows = run_benchmark(
        "deco_tiny", imgsz=96, threads=1, warmup=0, iters=1, include_hf=False, include_compile=False,
        include_onnx=False, include_pt2e=False, include_openvino=False, num_classes=8, throughput_batch=2,
        accuracy=RunnerEvaluator(data, batch_size=2),
    )  # fmt: skip
    peaks = [r for r in rows if r.runtime == PEAK_RUNTIME]
    assert {"fp32", "bf16"} <= {r.precision for r in peaks} and all(r.extra["peak_gflops"] > 0 for r in peaks)
    base = next(r for r in rows if r.runtime == "torch eager" and r.precision == "fp32")
    assert base.ratio == pytest.approx(1.0) and base.gflops > 0 and base.throughput > 0 and base.images_per_s > 0
    peak = {r.precision: r.extra["peak_gflops"] for r in peaks}
    assert base.peak_fraction == pytest.approx(base.gflops / (base.median_ms / 1e3) / peak["fp32"])
    autocast = next(r for r in rows if r.precision == "bf16 autocast")
    assert autocast.peak_key == "bf16"
    assert autocast.peak_fraction == pytest.approx(autocast.gflops / (autocast.median_ms / 1e3) / peak["bf16"])
    assert 0.0 <= base.ap <= 1.0 and base.ap_delta == pytest.approx(0.0)
    assert autocast.ap is not None and autocast.ap_delta == pytest.approx(100 * (autocast.ap - base.ap))
    if not torch.cuda.is_available():
        assert any(r.model == "GPU rows" and "skipped" in r.note for r in rows)
    header = format_table(rows, 2).splitlines()[0]
    for column in ("median ms", "img/s b2", "ratio", "GFLOP/s", "% own peak", "AP", "dAP", "note"):
        assert column in header
    # FLOP convention: a multiply-add is 2 FLOPs
    assert count_gflops(torch.nn.Linear(1000, 1000, bias=False), torch.zeros(1, 1000)) == pytest.approx(2e-3)


def test_only_builds_just_the_selected_rows(monkeypatch):
    """Rows left out by ``only`` cost nothing: no export, no int8 calibration, no compile."""
    from decodet.bench import rows as bench_rows

    def must_not_run(*_a, **_k):
        raise AssertionError("an excluded row was built")

    monkeypatch.setattr(bench_rows, "export_onnx", must_not_run)
    monkeypatch.setattr(bench_rows, "_pt2e_case", must_not_run)
    monkeypatch.setattr(bench_rows, "_compiled", must_not_run)
    rows = run_benchmark(
        "deco_tiny", imgsz=96, threads=1, warmup=0, iters=1, num_classes=8, throughput_batch=0,
        only=["bf16 autocast"], include_openvino=False,
    )  # fmt: skip
    labels = [(r.runtime, r.precision) for r in rows if r.runtime != PEAK_RUNTIME]
    assert labels[:2] == [("torch eager", "fp32"), ("torch eager", "bf16 autocast")]
    assert all(
        r.model == "GPU rows" for r in rows if (r.runtime, r.precision) not in labels[:2] and r.runtime != PEAK_RUNTIME
    )
