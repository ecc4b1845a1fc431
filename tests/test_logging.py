"""Run logging: JSONL / CSV metrics, plots, progress lines, logger setup."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from decodet.engine.metrics_log import MetricsLogger, plot_curves, read_metrics
from decodet.errors import DecodetError
from decodet.utils.console import progress, setup_logging


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_jsonl_and_csv(tmp_path):
    metrics = MetricsLogger(tmp_path / "run")
    metrics.log(epoch=0, step=10, train_loss=torch.tensor(2.5), lr=np.float32(0.5))
    metrics.log({"epoch": 0, "step": 20, "train_loss": 2.0, "val": {"AP": 0.125, "AP50": 0.25}})
    metrics.log(epoch=1, step=30, train_loss=1.5)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert records == read_metrics(tmp_path / "run")
    assert records[0]["train_loss"] == 2.5 and records[0]["lr"] == 0.5 and isinstance(records[0]["time"], float)
    assert records[1]["val/AP"] == 0.125
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert list(rows[0]) == ["epoch", "step", "train_loss", "lr", "time", "val/AP", "val/AP50"]  # header grew
    assert [r["step"] for r in rows] == ["10", "20", "30"]
    assert rows[1]["val/AP50"] == "0.25" and rows[2]["val/AP"] == "" and rows[2]["train_loss"] == "1.5"


def test_metrics_resume_torn_line_and_drop_after(tmp_path):
    metrics = MetricsLogger(tmp_path)
    for step in range(4):
        metrics.log(step=step, train_loss=1.0 / (step + 1))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train_lo')  # a power cut mid-record
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]  # torn tail skipped when reading
    resumed = MetricsLogger(tmp_path)
    resumed.log(step=4, train_loss=0.2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]
    assert resumed.drop_after("step", 1) == 3
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]
    assert [r["step"] for r in read_csv(tmp_path / "metrics.csv")] == ["0", "1"]


def test_read_metrics_errors(tmp_path):
    with pytest.raises(DecodetError, match="metrics.jsonl: file not found"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(DecodetError, match="metrics.jsonl: line 2 is not valid JSON"):
        read_metrics(tmp_path)


def test_plot_curves_writes_pngs(tmp_path):
    metrics = MetricsLogger(tmp_path)
    for epoch in range(3):
        for step in range(epoch * 5, epoch * 5 + 5):
            metrics.log(epoch=epoch, step=step, train_loss=10.0 / (step + 1))
        metrics.log(epoch=epoch, step=epoch * 5 + 4, val_loss=5.0 / (epoch + 1), AP=0.1 * epoch, AP50=0.2 * epoch)
    written = plot_curves(tmp_path)
    assert [p.name for p in written] == ["loss.png", "map.png"]
    for path in written:
        assert path.stat().st_size > 0
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width > 100 and img.height > 100
            assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 2  # something was drawn
    assert not list(tmp_path.glob("*.tmp"))  # temp files renamed away


def test_plot_curves_without_eval_skips_map(tmp_path):
    metrics = MetricsLogger(tmp_path)
    metrics.log(loss=1.0)
    metrics.log(loss=0.5)
    assert [p.name for p in plot_curves(tmp_path)] == ["loss.png"]
    assert not (tmp_path / "map.png").exists()


def test_progress_logs_lines_without_tty(caplog):
    caplog.set_level(logging.INFO, logger="decodet")
    bar = progress(range(10), desc="epoch 1", disable=True, log_every=4)
    seen = []
    for i in bar:
        seen.append(i)
        bar.set_postfix(loss=1.0 / (i + 1))
    assert seen == list(range(10))
    lines = [r.getMessage() for r in caplog.records if r.name == "decodet.utils.console"]
    assert len(lines) == 3  # steps 4, 8 and the last one
    assert lines[0].startswith("epoch 1: 4/10 loss=0.25 ") and "eta 0:00:00" in lines[0]
    assert lines[-1].startswith("epoch 1: 10/10 loss=0.1 ")


def test_progress_bar_on_request(capsys):
    bar = progress([1, 2, 3], desc="val", disable=False)
    assert list(bar) == [1, 2, 3] and len(bar) == 3
    assert "val" in capsys.readouterr().err


def test_setup_logging_idempotent(tmp_path):
    log = logging.getLogger("decodet")
    before = list(log.handlers), log.level, log.propagate
    try:
        setup_logging("debug", log_file=tmp_path / "train.log")
        setup_logging("INFO", log_file=tmp_path / "train.log")
        assert len([h for h in log.handlers if getattr(h, "_decodet", False)]) == 2
        assert log.level == logging.INFO
        logging.getLogger("decodet.test").info("hello %d", 3)
        for h in log.handlers:
            h.flush()
        assert "decodet.test: hello 3" in (tmp_path / "train.log").read_text()
        with pytest.raises(DecodetError, match="unknown log level"):
            setup_logging("LOUD")
    finally:
        for h in [h for h in log.handlers if getattr(h, "_decodet", False)]:
            log.removeHandler(h)
            h.close()
        log.handlers[:] = before[0]
        log.setLevel(before[1])
        log.propagate = before[2]
