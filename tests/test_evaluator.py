"""COCO evaluation: same numbers as pycocotools run by hand, input formats, errors, accumulation."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DistributedSampler

from decodet.errors import DecodetError
from decodet.evaluation.evaluator import (
    STAT_NAMES,
    CocoEvaluator,
    evaluate_coco,
    format_stats,
    merge_detections,
)
from decodet.io.coco_results import detections_to_coco

CATEGORY_IDS = [1, 3, 7, 18]  # non-contiguous on purpose


def _q(x: float) -> float:
    """Quarter-pixel grid: exact in float32, so xyxy <-> xywh conversions lose nothing."""
    return round(x * 4) / 4


def make_gt(seed: int = 0, num_images: int = 10, empty_images: int = 2) -> dict:
    """Small/medium/large objects, a crowd box, and images without any annotation."""
    rng = random.Random(seed)
    images, annotations = [], []
    for i in range(num_images + empty_images):
        image_id = 100 + 3 * i
        images.append({"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id}.jpg"})
        if i >= num_images:
            continue
        for _ in range(rng.randint(1, 6)):
            side = rng.choice([rng.uniform(8, 28), rng.uniform(40, 90), rng.uniform(110, 300)])
            w, h = _q(side * rng.uniform(0.7, 1.3)), _q(side * rng.uniform(0.7, 1.3))
            x, y = _q(rng.uniform(0, 640 - w)), _q(rng.uniform(0, 480 - h))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": rng.choice(CATEGORY_IDS),
                    "bbox": [x, y, w, h],
                    "area": w * h * 0.8,
                    "iscrowd": int(rng.random() < 0.05),
                }
            )
    categories = [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}


def make_results(gt: dict, seed: int = 1, extra: int = 4) -> list[dict]:
    """Jittered true positives, wrong classes, misses and false positives, quarter-pixel boxes."""
    rng = random.Random(seed)
    results = []
    for ann in gt["annotations"]:
        if rng.random() < 0.15:
            continue  # a miss
        x, y, w, h = ann["bbox"]
        jitter = lambda v, s: _q(max(0.0, v + rng.gauss(0, s)))  # noqa: E731
        box = [jitter(x, w * 0.08), jitter(y, h * 0.08), jitter(w, w * 0.1) + 0.25, jitter(h, h * 0.1) + 0.25]
        category = ann["category_id"] if rng.random() < 0.85 else rng.choice(CATEGORY_IDS)
        results.append({"image_id": ann["image_id"], "category_id": category, "bbox": box, "score": rng.random()})
    for img in gt["images"]:
        for _ in range(rng.randint(0, extra)):
            w, h = _q(rng.uniform(5, 200)), _q(rng.uniform(5, 200))
            box = [_q(rng.uniform(0, 400)), _q(rng.uniform(0, 250)), w, h]
            results.append(
                {"image_id": img["id"], "category_id": rng.choice(CATEGORY_IDS), "bbox": box, "score": rng.random()}
            )
    # float32-exact scores so tensors carry the same values
    for r in results:
        r["score"] = float(np.float32(r["score"]))
    return results


def results_to_dict(results: list[dict], gt: dict, to=torch.tensor) -> dict:
    dets = {img["id"]: {"boxes": [], "scores": [], "labels": []} for img in gt["images"]}
    for r in results:
        x, y, w, h = r["bbox"]
        d = dets[r["image_id"]]
        d["boxes"].append([x, y, x + w, y + h])
        d["scores"].append(r["score"])
        d["labels"].append(r["category_id"])
    out = {}
    for image_id, d in dets.items():
        boxes = np.asarray(d["boxes"], dtype=np.float32).reshape(-1, 4)
        out[image_id] = {
            "boxes": to(boxes),
            "scores": to(np.asarray(d["scores"], dtype=np.float32)),
            "labels": to(np.asarray(d["labels"], dtype=np.int64)),
        }
    return out


def pycocotools_by_hand(gt: dict, results: list[dict], image_ids=None) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        dt = coco.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco, dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats]


@pytest.fixture(scope="module")
def gt() -> dict:
    return make_gt()


@pytest.fixture(scope="module")
def results(gt) -> list[dict]:
    return make_results(gt)


def test_matches_pycocotools_exactly(gt, results):
    expected = pycocotools_by_hand(gt, results)
    stats = evaluate_coco(gt, results)
    assert list(stats) == list(STAT_NAMES)
    assert [stats[k] for k in STAT_NAMES] == expected
    assert all(isinstance(v, float) for v in stats.values())
    assert 0.1 < stats["AP"] < 0.95 and stats["APs"] >= 0 and stats["APl"] >= 0  # a plausible, non-trivial case


@pytest.mark.parametrize("seed", [2, 3])
def test_matches_pycocotools_other_seeds_and_subset(seed):
    gt = make_gt(seed, num_images=6, empty_images=1)
    results = make_results(gt, seed=seed + 10, extra=40)  # > 10 per image: AR1 / AR10 differ from AR100
    ids = [img["id"] for img in gt["images"]][1::2]
    assert [evaluate_coco(gt, results)[k] for k in STAT_NAMES] == pycocotools_by_hand(gt, results)
    subset = evaluate_coco(gt, results, image_ids=ids)
    assert [subset[k] for k in STAT_NAMES] == pycocotools_by_hand(gt, results, image_ids=ids)


def test_inputs_not_mutated(gt, results):
    gt_copy, results_copy = copy.deepcopy(gt), copy.deepcopy(results)
    evaluate_coco(gt, results)
    assert gt == gt_copy and results == results_copy  # loadRes would add 'area', 'id', ... to the list


def test_detection_formats_agree(gt, results, tmp_path):
    expected = evaluate_coco(gt, results)
    gt_path, res_path = tmp_path / "gt.json", tmp_path / "res.json"
    gt_path.write_text(json.dumps(gt))
    res_path.write_text(json.dumps(results))
    assert evaluate_coco(str(gt_path), res_path) == expected
    assert evaluate_coco(gt, results_to_dict(results, gt)) == expected
    assert evaluate_coco(gt, results_to_dict(results, gt, to=np.asarray)) == expected
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_path))
    assert evaluate_coco(coco, results) == expected


def test_empty_detections_are_zero(gt):
    for empty in ([], {}, {gt["images"][0]["id"]: {"boxes": torch.zeros(0, 4), "scores": [], "labels": []}}):
        stats = evaluate_coco(gt, empty)
        assert stats == dict.fromkeys(STAT_NAMES, 0.0)


def test_missing_area_and_iscrowd_default(gt, results):
    bare = copy.deepcopy(gt)
    for ann in bare["annotations"]:
        ann.pop("iscrowd")
        ann["area"] = ann["bbox"][2] * ann["bbox"][3]
    bare["annotations"][0].pop("area")
    full = copy.deepcopy(bare)
    for ann in full["annotations"]:
        ann["iscrowd"] = 0
        ann["area"] = ann["bbox"][2] * ann["bbox"][3]
    assert evaluate_coco(bare, results) == evaluate_coco(full, results)


def test_detections_to_coco_topk_and_xywh():
    boxes = torch.tensor([[10.0, 20.0, 30.5, 60.25], [0, 0, 1, 1], [5, 5, 6, 8]])
    dets = {7: {"boxes": boxes, "scores": torch.tensor([0.5, 0.25, 0.75]), "labels": torch.tensor([3, 1, 18])}}
    out = detections_to_coco(dets, max_dets=2)
    assert out == [
        {"image_id": 7, "category_id": 3, "bbox": [10.0, 20.0, 20.5, 40.25], "score": 0.5},
        {"image_id": 7, "category_id": 18, "bbox": [5.0, 5.0, 1.0, 3.0], "score": 0.75},
    ]
    assert all(type(v) in (int, float) for r in out for v in (r["image_id"], r["category_id"], r["score"], *r["bbox"]))
    assert len(detections_to_coco(dets, max_dets=None)) == 3
    assert json.loads(json.dumps(out)) == out


def test_format_stats(gt, results):
    text = format_stats(evaluate_coco(gt, results))
    lines = text.splitlines()
    assert len(lines) == 12
    assert lines[0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.")
    assert lines[7].startswith(" Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ]")


def test_bad_inputs_raise_decodet_error(gt, results, tmp_path):
    with pytest.raises(DecodetError, match="missing.json: file not found"):
        evaluate_coco(tmp_path / "missing.json", results)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(DecodetError, match="broken.json: malformed JSON"):
        evaluate_coco(broken, results)
    with pytest.raises(DecodetError, match="broken.json: malformed JSON"):
        evaluate_coco(gt, broken)
    not_coco = tmp_path / "not_coco.json"
    not_coco.write_text(json.dumps({"images": []}))
    with pytest.raises(DecodetError, match="not_coco.json: .*'annotations' must be a list"):
        evaluate_coco(not_coco, results)
    res_dict = tmp_path / "res_dict.json"
    res_dict.write_text(json.dumps({"a": 1}))
    with pytest.raises(DecodetError, match="res_dict.json: .*JSON list"):
        evaluate_coco(gt, res_dict)
    res_path = tmp_path / "res.json"
    res_path.write_text(json.dumps([*results, {**results[0], "image_id": 999}]))
    with pytest.raises(DecodetError, match=r"res.json: detections for 1 image id\(s\) not in the ground truth: 999"):
        evaluate_coco(gt, res_path)
    with pytest.raises(DecodetError, match="not in the ground truth: 5"):
        evaluate_coco(gt, {5: {"boxes": torch.zeros(0, 4), "scores": [], "labels": []}})
    with pytest.raises(DecodetError, match="image_ids has 1 image id"):
        evaluate_coco(gt, results, image_ids=[100, 4242])
    for bad in ({**results[0], "bbox": [1, 2, 3]}, {**results[0], "score": float("nan")}, {"image_id": 100}):
        with pytest.raises(DecodetError, match="detections #0"):
            evaluate_coco(gt, [bad])
    with pytest.raises(DecodetError, match="boxes must be"):
        evaluate_coco(gt, {100: {"boxes": torch.zeros(2, 5), "scores": torch.zeros(2), "labels": torch.zeros(2)}})
    dup = copy.deepcopy(gt)
    dup["annotations"][1]["id"] = dup["annotations"][0]["id"]
    with pytest.raises(DecodetError, match="ground truth: annotation id 1 appears twice"):
        evaluate_coco(dup, results)
    with pytest.raises(DecodetError, match="iou_type"):
        evaluate_coco(gt, results, iou_type="segm")


def test_accumulator_deduplicates_padded_sampler(gt, results):
    """3 ranks over 12 images with a padding DistributedSampler: repeats are counted once."""
    all_dets = results_to_dict(results, gt)
    image_ids = [img["id"] for img in gt["images"]][:-1]  # 11 images: the sampler pads to 12
    parts = []
    for rank in range(3):
        sampler = DistributedSampler(image_ids, num_replicas=3, rank=rank, shuffle=False)
        ev = CocoEvaluator()
        indices = list(sampler)
        for start in range(0, len(indices), 2):  # batches of 2
            batch = [image_ids[i] for i in indices[start : start + 2]]
            ev.update(torch.tensor(batch), [all_dets[i] for i in batch])
        parts.append(ev._dets)
    assert sum(len(p) for p in parts) == 12  # one image seen twice
    merged = CocoEvaluator()
    merged._dets = merge_detections(parts)
    assert merged.image_ids == sorted(image_ids)
    expected = evaluate_coco(gt, results, image_ids=image_ids)
    assert merged.summarize(gt) == expected
    assert expected != evaluate_coco(gt, results)  # the subset matters: the last image is left out


def test_accumulator_update_twice_and_max_dets(gt, results):
    dets = results_to_dict(results, gt)
    ev = CocoEvaluator(max_dets=1)
    first = next(iter(dets))
    ev.update([first, first], [dets[first], {"boxes": torch.zeros(0, 4), "scores": [], "labels": []}])
    assert len(ev) == 1 and len(ev._dets[first]["scores"]) == 1
    assert ev._dets[first]["scores"][0] == dets[first]["scores"].max().item()
    ev.gather()  # no process group: a no-op
    assert len(ev) == 1
    ev.reset()
    with pytest.raises(RuntimeError):
        ev.summarize(gt)
    with pytest.raises(ValueError):
        ev.update([1, 2], [dets[first]])


def _gather_worker(rank: int, world: int, init_file: str, dets: dict, out_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ids = sorted(dets)
        ev = CocoEvaluator()
        mine = ids[rank::world] + ids[:1]  # every rank also sees the first image (padding)
        ev.update(mine, [dets[i] for i in mine])
        ev.gather()
        if rank == 0:
            torch.save({k: v["scores"] for k, v in ev._dets.items()}, out_file)
    finally:
        torch.distributed.destroy_process_group()


def test_gather_across_processes(gt, results, tmp_path):
    dets = results_to_dict(results, gt)
    out = tmp_path / "gathered.pt"
    torch.multiprocessing.spawn(_gather_worker, args=(2, str(tmp_path / "init"), dets, str(out)), nprocs=2)
    gathered = torch.load(out, weights_only=False)
    assert sorted(gathered) == sorted(dets)
    for image_id, scores in gathered.items():
        np.testing.assert_array_equal(scores, dets[image_id]["scores"].numpy())
