"""benchmarks/convergence: the three generated sets (valid, distinct, deterministic) and the ablation's
bookkeeping (table, resume, atomic writes) on fake results; nothing is trained."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from decodet.data import CocoDetection, resolve_data

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "convergence"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"convergence_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


make_sets = _load("make_sets")
ablate = _load("ablate")


def _stats(root: Path, split: str = "train") -> dict:
    raw = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    per_image = np.bincount([a["image_id"] for a in raw["annotations"]], minlength=len(raw["images"]) + 1)[1:]
    sides = np.array([max(a["bbox"][2], a["bbox"][3]) for a in raw["annotations"]])
    return {
        "per_image": per_image,
        "sides": sides / raw["images"][0]["width"],
        "ids": sorted(c["id"] for c in raw["categories"]),
        "used": {a["category_id"] for a in raw["annotations"]},
    }


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv_sets")
    names = ["small", "fewshot"]
    try:
        import skimage  # noqa: F401  (the bench extra)

        names.append("photo")
    except ImportError:
        pass
    return {n: make_sets.write_set(n, root / n, seed=5, train=6, val=3) for n in names}


@pytest.mark.parametrize("name", make_sets.SETS)
def test_sets_are_read_by_decodet(sets, name):
    if name not in sets:
        pytest.importorskip("skimage")
    spec = resolve_data(sets[name])
    assert set(spec.splits) == {"train", "val"}
    train = CocoDetection.from_split(spec.split("train"))
    assert len(train) == 6 and len(CocoDetection.from_split(spec.split("val"))) == 3
    image, target = train[0]
    size = make_sets.set_spec(name).image_size
    assert image.shape == (3, size, size)
    assert len(target["labels"]) > 0 and (target["labels"] < train.num_classes).all()
    boxes = target["boxes"]
    assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0 and boxes.max() <= size


def test_statistics_differ_as_promised(sets):
    small, few = _stats(sets["small"]), _stats(sets["fewshot"])
    assert small["per_image"].min() >= 20 and small["per_image"].max() <= 60
    assert few["per_image"].min() >= 1 and few["per_image"].max() <= 5
    assert small["sides"].max() <= 0.07  # 2-6% of the side (plus rounding)
    assert np.median(few["sides"]) > 3 * np.median(small["sides"])
    assert len(few["ids"]) >= 20 and len(small["ids"]) == 8
    fewshot = make_sets.set_spec("fewshot")
    assert fewshot.train + fewshot.val <= 500  # a few hundred images only
    assert make_sets.set_spec("small").train > fewshot.train


def test_photo_set_has_sparse_ids_and_photo_backgrounds(sets):
    pytest.importorskip("skimage")
    photo = _stats(sets["photo"])
    assert len(photo["ids"]) == 10
    assert photo["ids"] != list(range(photo["ids"][0], photo["ids"][0] + 10))  # not contiguous
    assert photo["used"] <= set(photo["ids"])
    assert 3 <= photo["per_image"].min() and photo["per_image"].max() <= 15
    # every background is a crop of one of scikit-image's photographs: rich texture, unlike a gradient
    rng = np.random.default_rng(0)
    crop = make_sets._photo_crop(320, rng)
    flat = make_sets._gradient(320, rng, (0.0, 0.5))
    assert np.abs(np.diff(crop, axis=1)).mean() > 2 * np.abs(np.diff(flat, axis=1)).mean()


def test_sets_are_deterministic(sets, tmp_path):
    again = make_sets.write_set("small", tmp_path / "small", seed=5, train=6, val=3)
    for rel in ("annotations/instances_train.json", "annotations/instances_val.json", "train/000004.jpg"):
        assert (again / rel).read_bytes() == (sets["small"] / rel).read_bytes()
    other = make_sets.write_set("small", tmp_path / "other", seed=6, train=6, val=3)
    assert (other / "train/000004.jpg").read_bytes() != (again / "train/000004.jpg").read_bytes()
    # an existing set written with the same arguments is kept; with others, refused without overwrite
    assert make_sets.write_set("small", again, seed=5, train=6, val=3) == again
    with pytest.raises(SystemExit):
        make_sets.write_set("small", again, seed=7, train=6, val=3)
    make_sets.write_set("small", again, seed=7, train=2, val=1, overwrite=True)
    assert len(json.loads((again / "annotations/instances_train.json").read_text())["images"]) == 2
    assert not list(tmp_path.glob("*.tmp"))


def _fake_run(cmd: list[str], log: Path) -> int:
    """Stands in for `decodet train`: writes a run folder's metrics.jsonl as the trainer would."""
    project = Path(cmd[cmd.index("--project") + 1])
    run = project / cmd[cmd.index("--name") + 1]
    run.mkdir(parents=True, exist_ok=True)
    ap = 0.1 + 0.01 * len(cmd)
    records = [
        {"epoch": 1, "step": 40, "epoch_time": 30.0, "train/loss": 9.0, "val/AP": 0.01, "val/subset": 100},
        {"epoch": 2, "step": 80, "epoch_time": 30.0, "train/loss": 8.0, "val/AP": ap, "val/AP50": 2 * ap,
         "val/APs": -1.0},
    ]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"epoch": 3, "st')
    _fake_run.calls.append((project.name, run.name))
    return 0


def test_ablation_table_resume_and_atomic_writes(tmp_path):
    out, table = tmp_path / "conv", tmp_path / "table.md"
    _fake_run.calls = []
    datasets = {"photo": "p", "small": "s", "fewshot": "f"}
    configs = ["default", "readme-recipe"]

    def run_all():
        for d in ablate.order_datasets(list(datasets), "photo"):
            for c in configs:
                ablate.run_pair(d, datasets[d], c, 0.5, out, runner=_fake_run)
        return ablate.write_report(out, table, tmp_path / "raw.json", list(datasets), configs, "photo", 0.5)

    # a half-done pair: a run folder but no result file -> cleared and run again
    stale = out / "runs" / "small" / "default"
    stale.mkdir(parents=True)
    (stale / "metrics.jsonl").write_text('{"epoch": 1, "step": 999, "val/AP": 0.9}\n')
    results = run_all()
    assert len(_fake_run.calls) == 6 and len(results) == 6
    assert results[("small", "default")]["steps"] == 80  # not the stale folder's 999
    r = results[("small", "default")]
    assert r["AP"] == pytest.approx(r["best_AP"]) and r["train_min"] == pytest.approx(1.0)

    lines = table.read_text().splitlines()
    rows = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows][-2:] == ["| photo (held out)"] * 2  # held out last
    assert rows[0].startswith("| small | default | ")
    assert " – " in rows[0]  # APs -1 (no object of that size) shows as a dash
    raw = json.loads((tmp_path / "raw.json").read_text())
    assert raw["datasets"][-1] == "photo" and len(raw["results"]) == 6

    # resume: nothing runs again; a removed result file runs that pair only
    _fake_run.calls = []
    run_all()
    assert _fake_run.calls == []
    ablate.result_path(out, "fewshot", "readme-recipe", 0.5).unlink()
    run_all()
    assert _fake_run.calls == [("fewshot", "readme-recipe")]
    # another budget is another result
    assert ablate.result_path(out, "fewshot", "default", 1) != ablate.result_path(out, "fewshot", "default", 0.5)
    assert not list(tmp_path.rglob("*.tmp"))


def test_failed_run_leaves_no_result_and_table_shows_missing(tmp_path):
    out = tmp_path / "conv"
    assert ablate.run_pair("small", "s", "default", 0.5, out, runner=lambda cmd, log: 1) is None
    assert not ablate.result_path(out, "small", "default", 0.5).exists()
    text = ablate.format_table({}, ["small"], ["default"], None, 0.5)
    assert "| small | default | – | – | – | – | – | – |" in text


def test_cli_table_only_and_configs(tmp_path, capsys):
    assert set(ablate.CONFIGS) >= {"default", "readme-recipe"} and ablate.CONFIGS["default"] == []
    table = tmp_path / "t.md"
    rc = ablate.main(["--datasets", "a=/x,b=/y", "--configs", "default", "--time-budget-min", "2",
                      "--held-out", "a", "--out", str(tmp_path), "--table", str(table), "--table-only"])  # fmt: skip
    assert rc == 0 and "| b | default |" in table.read_text() and table.with_suffix(".json").exists()
    with pytest.raises(SystemExit):
        ablate.main(["--datasets", "a=/x", "--configs", "nope", "--time-budget-min", "1", "--table", str(table)])
