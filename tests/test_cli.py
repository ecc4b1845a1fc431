"""The ``decodet`` CLI end to end on a tiny generated dataset: synth -> train -> eval ->
predict -> export -> convert, and one-line errors for user mistakes."""

from __future__ import annotations

import json

import pytest

from decodet.cli import main
from decodet.evaluation.evaluator import evaluate_coco


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "synth"
    assert main(["data", "synth", str(out), "--train", "6", "--val", "4", "--image-size", "96", "--seed", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    argv = ["train", "--model", "deco_tiny", "--data", str(tiny_data), "--imgsz", "96", "--epochs", "1"]
    argv += ["--batch-size", "2", "--workers", "0", "--threads", "1", "--project", str(runs), "--name", "t"]
    assert main(argv) == 0
    return runs / "t"


def test_train_writes_run_folder(trained):
    for name in ("best.safetensors", "last.safetensors", "last_state.pt", "metrics.jsonl", "train_config.yaml"):
        assert (trained / name).is_file(), name
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert any("AP" in r or "val/AP" in r for r in records)


def test_eval_prints_stats(trained, tiny_data, capsys):
    assert (
        main(["eval", "--weights", str(trained / "best.safetensors"), "--data", str(tiny_data), "--imgsz", "96"]) == 0
    )
    assert "Average Precision" in capsys.readouterr().out


def test_predict_writes_drawn_images_and_valid_coco_results(trained, tiny_data, tmp_path):
    out = tmp_path / "pred"
    ann = tiny_data / "annotations" / "instances_val.json"
    argv = ["predict", str(tiny_data / "val"), "--weights", str(trained / "best.safetensors"), "--out", str(out)]
    assert main([*argv, "--threshold", "0.0", "--ann", str(ann)]) == 0
    assert len(list(out.glob("*.jpg"))) == 4
    results = json.loads((out / "predictions.json").read_text())
    assert results and {"image_id", "category_id", "bbox", "score"} <= set(results[0])
    stats = evaluate_coco(ann, results)  # accepted by the evaluator
    assert set(stats) >= {"AP", "AP50", "AR100"}


def test_export_and_predict_with_onnxruntime(trained, tiny_data, tmp_path):
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", "--weights", str(trained / "best.safetensors"), "--out", str(onnx_path)]) == 0
    assert onnx_path.is_file()
    out = tmp_path / "pred"
    argv = ["predict", str(tiny_data / "val"), "--weights", str(onnx_path), "--backend", "onnxruntime"]
    assert main([*argv, "--out", str(out)]) == 0
    assert (out / "predictions.json").is_file()


def test_models_lists_presets(capsys):
    assert main(["models"]) == 0
    assert "deco_tiny" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["eval", "--weights", "missing.safetensors", "--data", "nowhere"], "not found"),
        (["train", "--model", "deco_nope", "--data", "nowhere"], "deco_nope"),
        (["predict", "missing_folder", "--weights", "missing.safetensors"], "missing"),
        (["convert", "missing.pth", "out.safetensors"], "not found"),
    ],
)
def test_user_mistakes_are_one_line_errors(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("decodet: error:") and expected in err[0]


def test_demo_runs_end_to_end_on_existing_data(tiny_data, tmp_path, capsys):
    """``decodet demo`` with a dataset already in place (no generation) and a tiny time budget:
    trains, evaluates, draws, and says where everything is."""
    out = tmp_path / "demo"
    assert main(["demo", "--data", str(tiny_data), "--out", str(out), "--minutes", "0.01", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "validation mAP@[.5:.95]" in printed and str(out / "best.safetensors") in printed
    for name in ("best.safetensors", "metrics.jsonl", "train_config.yaml", "predictions/predictions.json"):
        assert (out / name).is_file(), name
    assert len(list((out / "predictions").glob("*.jpg"))) == 4  # every validation image drawn
    assert "zoom: 0.0" in (out / "train_config.yaml").read_text()  # the demo's recipe was used


def test_demo_trains_small_first_then_at_the_bundled_size_on_a_short_run(tmp_path):
    """The 12.5-minute demo resizes its first 35% to 160 px, then trains at the bundled images' 256, where it is
    evaluated and saved (docs/convergence.md); a demo of 30 minutes or more keeps 256 throughout."""
    from decodet.demo import LONG_IMGSZ, MINUTES, demo_config
    from decodet.engine.data_recipe import AUGMENT_MIN_MINUTES, short_run

    short = demo_config(tmp_path, tmp_path / "demo", MINUTES, 1)
    assert (short.imgsz, short.start_imgsz, short.start_fraction) == (256, 160, 0.35)
    assert short_run(short) is not None
    short.validate()
    long = demo_config(tmp_path, tmp_path / "demo", AUGMENT_MIN_MINUTES, 1)
    assert long.imgsz == LONG_IMGSZ == 256 and long.start_imgsz is None and short_run(long) is None
