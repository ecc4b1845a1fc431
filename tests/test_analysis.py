"""Evaluation that explains itself: per-class numbers, confusion matrix, ``decodet eval --plots``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from decodet.evaluation.analysis import (
    PER_CLASS_CSV,
    confusion_matrix,
    per_class_stats,
    read_per_class_csv,
)
from decodet.evaluation.evaluator import STAT_NAMES, evaluate_coco, run_coco_eval


def _random_dataset(seed: int = 0, n_images: int = 12):
    """Ground truth with 3 classes (plus one without boxes) and detections that jitter, drop,
    mislabel and invent boxes, with random scores."""
    rng = np.random.default_rng(seed)
    cats = [{"id": c, "name": n} for c, n in ((1, "cat"), (2, "dog"), (5, "owl"), (9, "none"))]
    images, anns, dets = [], [], []
    for i in range(n_images):
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 200, "height": 200})
        for _ in range(rng.integers(1, 6)):
            w, h = rng.uniform(8, 80, 2)
            x, y = rng.uniform(0, 200 - w), rng.uniform(0, 200 - h)
            cid = int(rng.choice([1, 2, 5]))
            crowd = int(rng.random() < 0.05)
            anns.append(
                {"id": len(anns) + 1, "image_id": i + 1, "category_id": cid, "bbox": [x, y, w, h], "iscrowd": crowd}
            )
            if rng.random() < 0.8:  # found, a little off, sometimes with the wrong class
                jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
                label = cid if rng.random() < 0.85 else int(rng.choice([1, 2, 5]))
                box = [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])]
                dets.append({"image_id": i + 1, "category_id": label, "bbox": box, "score": float(rng.random())})
        for _ in range(rng.integers(0, 4)):  # false boxes
            w, h = rng.uniform(8, 60, 2)
            box = [float(rng.uniform(0, 140)), float(rng.uniform(0, 140)), float(w), float(h)]
            label, score = int(rng.choice([1, 2, 5])), 0.5 * rng.random()
            dets.append({"image_id": i + 1, "category_id": label, "bbox": box, "score": score})
    return {"images": images, "annotations": anns, "categories": cats}, dets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_aps_average_to_the_overall_stats(seed: int) -> None:
    gt, dets = _random_dataset(seed)
    ev = run_coco_eval(gt, dets)
    rows = per_class_stats(ev)
    assert [r["name"] for r in rows] == ["cat", "dog", "owl", "none"]
    # the class without ground truth gets pycocotools' -1 and stays out of the means
    assert rows[-1]["num_gt"] == 0 and rows[-1]["AP"] == rows[-1]["AP50"] == rows[-1]["AR100"] == -1.0
    valid = [r for r in rows if r["num_gt"] > 0]
    assert len(valid) == 3
    stats = dict(zip(STAT_NAMES, ev.stats))
    assert 0.05 < stats["AP"] < 0.95  # a non-trivial case
    for key in ("AP", "AP50", "AR100"):
        assert np.mean([r[key] for r in valid]) == pytest.approx(stats[key], abs=1e-12)
    for r in valid:
        expected = sum(a["category_id"] == r["category_id"] and not a["iscrowd"] for a in gt["annotations"])
        assert r["num_gt"] == expected
    # run_coco_eval is what evaluate_coco reports: the 12 stats are pycocotools'
    assert evaluate_coco(gt, dets) == {k: float(v) for k, v in stats.items()}


def test_per_class_ap_of_a_perfect_class_is_one_and_of_an_undetected_class_zero() -> None:
    gt, _ = _random_dataset(3)
    dets = [
        {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9}
        for a in gt["annotations"]
        if a["category_id"] == 1 and not a["iscrowd"]
    ]
    rows = {r["name"]: r for r in per_class_stats(run_coco_eval(gt, dets))}
    assert rows["cat"]["AP"] == pytest.approx(1.0) and rows["cat"]["AR100"] == pytest.approx(1.0)
    assert rows["dog"]["AP"] == 0.0 and rows["owl"]["AR100"] == 0.0


def _hand_case():
    """Three images; see test_confusion_matrix_counts_a_hand_built_case for the expected outcome."""
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    images = [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in (1, 2, 3)]

    def ann(id_, image_id, cid, box, crowd=0):
        return {"id": id_, "image_id": image_id, "category_id": cid, "bbox": box, "iscrowd": crowd}

    anns = [
        ann(11, 1, 1, [0, 0, 10, 10]),  # A: cat, found
        ann(12, 1, 2, [20, 20, 10, 10]),  # B: dog, found as a cat
        ann(13, 1, 1, [50, 50, 10, 10]),  # C: cat, missed
        ann(21, 2, 1, [0, 0, 50, 50], crowd=1),  # a crowd of cats
        ann(22, 2, 2, [60, 60, 20, 20]),  # D: dog, found
        ann(31, 3, 1, [0, 0, 20, 20]),  # E: cat, found by a cat and (better IoU) a dog
    ]

    def det(image_id, cid, box, score):
        return {"image_id": image_id, "category_id": cid, "bbox": box, "score": score}

    dets = [
        det(1, 1, [0, 0, 10, 10], 0.9),  # on A: cat -> cat
        det(1, 1, [20, 20, 10, 10], 0.8),  # on B: dog -> cat
        det(1, 2, [80, 80, 10, 10], 0.7),  # nothing there: false dog
        det(1, 2, [0, 0, 10, 10], 0.6),  # a second box on A, which the cat took: false dog
        det(1, 1, [50, 50, 10, 10], 0.2),  # on C but under the score threshold: not counted
        det(2, 1, [5, 5, 10, 10], 0.9),  # inside the crowd: ignored
        det(2, 2, [62, 60, 20, 20], 0.8),  # on D (IoU 360/440): dog -> dog
        det(2, 1, [60, 60, 20, 20], 0.5),  # also on D, but D went to the dog: false cat
        det(3, 2, [0, 0, 20, 20], 0.9),  # on E with IoU 1, wrong class: false dog
        det(3, 1, [2, 0, 20, 20], 0.8),  # on E with IoU 0.82, same class: cat -> cat
    ]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def test_confusion_matrix_counts_a_hand_built_case() -> None:
    gt, dets = _hand_case()
    conf = confusion_matrix(run_coco_eval(gt, dets), iou_threshold=0.5, score_threshold=0.3)
    assert conf.names == ["cat", "dog"] and conf.category_ids == [1, 2]
    # rows: true cat, dog, background; columns: predicted cat, dog, background
    expected = [
        [2, 0, 1],  # A and E found as cats; C missed
        [1, 1, 0],  # B taken for a cat; D found
        [1, 3, 0],  # false: the cat on D; the dogs at (80, 80), on A and on E
    ]
    assert conf.matrix.tolist() == expected
    assert conf.errors == {1: (2, 3), 2: (0, 1), 3: (0, 1)}  # B counts as missed and as false
    assert conf.missed == {1: [12, 13], 2: [], 3: []}
    # a lower score threshold lets the weak cat on C in: C is found, nothing else changes
    low = confusion_matrix(run_coco_eval(gt, dets), score_threshold=0.1)
    assert low.matrix.tolist() == [[3, 0, 0], [1, 1, 0], [1, 3, 0]]
    # at IoU 0.9 the same-class pairs of IoU 0.82 are gone: the exact boxes of the wrong class
    # take D (a cat) and E (a dog), and the dog on D and the cat on E become false
    strict = confusion_matrix(run_coco_eval(gt, dets), iou_threshold=0.9)
    assert strict.matrix.tolist() == [[1, 1, 1], [2, 0, 0], [1, 3, 0]]


# ----------------------------------------------------------------------------- decodet eval --plots


@pytest.mark.slow
def test_eval_plots_writes_table_curves_matrix_and_worst_images(tmp_path: Path, capsys) -> None:
    from decodet.cli import main
    from decodet.engine.trainer import train
    from test_trainer import make_tiny_coco, tiny_config

    data = make_tiny_coco(tmp_path / "data", n_train=4, n_val=4)
    final = train(tiny_config(tmp_path, data, epochs=1, plots=False))
    out = tmp_path / "eval"
    weights = Path(final["run_dir"]) / "last.safetensors"
    args = ["eval", "--weights", str(weights), "--data", str(data), "--imgsz", "64", "--out", str(out)]
    assert main([*args, "--plots", "--plot-threshold", "0.0"]) == 0
    printed = capsys.readouterr().out

    stats = json.loads((out / "stats.json").read_text())
    gt_file = data / "annotations" / "instances_val.json"
    assert evaluate_coco(gt_file, out / "detections.json") == stats  # the 12 stats are pycocotools'
    gt = json.loads(gt_file.read_text())
    rows = read_per_class_csv(out / PER_CLASS_CSV)
    assert [(r["category_id"], r["name"]) for r in rows] == [(3, "red"), (7, "green")]
    for r in rows:
        assert r["num_gt"] == sum(a["category_id"] == r["category_id"] for a in gt["annotations"]) > 0
        assert f"{r['AP']:6.3f}" in printed
    assert np.mean([r["AP"] for r in rows]) == pytest.approx(stats["AP"], abs=1e-6)

    for name in ("pr_curves.png", "confusion_matrix.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and min(im.size) > 100
    with open(out / "confusion_matrix.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["true \\ predicted", "red", "green", "background"]
    counts = np.array([[int(v) for v in row[1:]] for row in table[1:]])
    assert counts[:2].sum() == len(gt["annotations"])  # every true box is found or missed once
    # threshold 0: every detection counts, so matched + false = all detections (16 queries x 2 classes)
    assert counts[:, :2].sum() == len(json.loads((out / "detections.json").read_text()))

    worst = out / "worst_images"
    with open(worst / "index.csv", newline="") as f:
        index = list(csv.DictReader(f))
    drawn = sorted(p.name for p in worst.glob("*.jpg"))
    assert len(drawn) == len(index) == 4  # each image has false boxes at threshold 0
    errors = [int(r["missed"]) + int(r["false"]) for r in index]
    assert errors == sorted(errors, reverse=True)
    with Image.open(worst / drawn[0]) as im, Image.open(data / "val" / index[0]["file_name"]) as src:
        assert im.size == src.size
        assert np.abs(np.asarray(im, dtype=int) - np.asarray(src.convert("RGB"), dtype=int)).max() > 100  # boxes drawn
