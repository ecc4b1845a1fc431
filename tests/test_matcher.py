"""Hungarian matcher: optimality against brute force, edge cases, one-to-many repetition."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from decodet.errors import DecodetError
from decodet.losses import HungarianMatcher

COSTS = {"cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0}


def _random_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    """[n, 4] cxcywh boxes inside the unit square."""
    wh = 0.05 + 0.4 * torch.rand(n, 2, generator=gen)
    c = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=gen)
    return torch.cat([c, wh], dim=1)


def _case(num_queries: list[int] | int, num_targets: list[int], num_classes: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    batch = len(num_targets)
    outputs = {
        "pred_logits": torch.randn(batch, num_queries, num_classes, generator=gen) * 2,
        "pred_boxes": torch.stack([_random_boxes(num_queries, gen) for _ in range(batch)]),
    }
    targets = [
        {"labels": torch.randint(0, num_classes, (n,), generator=gen), "boxes": _random_boxes(n, gen)}
        for n in num_targets
    ]
    return outputs, targets


def _pair_cost(logit: float, box_q, label: int, box_t, alpha: float = 0.25, gamma: float = 2.0) -> float:
    """The matching cost of one (query, target) pair from the published formula, in plain Python."""
    p = 1 / (1 + math.exp(-logit[label]))
    focal = alpha * (1 - p) ** gamma * -math.log(p + 1e-8) - (1 - alpha) * p**gamma * -math.log(1 - p + 1e-8)
    l1 = sum(abs(a - b) for a, b in zip(box_q, box_t))

    def corners(b):
        return b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2

    ax0, ay0, ax1, ay1 = corners(box_q)
    bx0, by0, bx1, by1 = corners(box_t)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    giou = inter / union - (hull - union) / hull
    return COSTS["cost_class"] * focal + COSTS["cost_bbox"] * l1 - COSTS["cost_giou"] * giou


def _cost_table(outputs, targets, b: int) -> list[list[float]]:
    logits, boxes = outputs["pred_logits"][b].tolist(), outputs["pred_boxes"][b].tolist()
    labels, tboxes = targets[b]["labels"].tolist(), targets[b]["boxes"].tolist()
    return [
        [_pair_cost(logits[q], boxes[q], labels[t], tboxes[t]) for t in range(len(labels))] for q in range(len(boxes))
    ]


def _brute_force_min(table: list[list[float]]) -> float:
    num_q, num_t = len(table), len(table[0])
    if num_q >= num_t:  # every target gets a distinct query
        return min(sum(table[q][t] for t, q in enumerate(qs)) for qs in itertools.permutations(range(num_q), num_t))
    return min(sum(table[q][t] for q, t in enumerate(ts)) for ts in itertools.permutations(range(num_t), num_q))


@pytest.mark.parametrize(("num_queries", "num_targets"), [(5, [3, 1]), (3, [5, 2]), (4, [4, 0])])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_assignment_is_optimal(num_queries, num_targets, seed):
    outputs, targets = _case(num_queries, num_targets, seed=seed)
    matcher = HungarianMatcher(**COSTS)
    indices = matcher(outputs, targets)
    assert len(indices) == len(targets)
    for b, (q_idx, t_idx) in enumerate(indices):
        n = num_targets[b]
        assert q_idx.dtype == torch.int64 and t_idx.dtype == torch.int64
        assert len(q_idx) == len(t_idx) == min(num_queries, n)
        assert len(set(q_idx.tolist())) == len(q_idx) and len(set(t_idx.tolist())) == len(t_idx)
        if n == 0:
            continue
        table = _cost_table(outputs, targets, b)
        total = sum(table[q][t] for q, t in zip(q_idx.tolist(), t_idx.tolist()))
        assert total == pytest.approx(_brute_force_min(table), rel=1e-5, abs=1e-5)


def test_obvious_match():
    # Query 2 sits on the target and scores its class: it must be chosen.
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.2, 0.2], [0.5, 0.5, 0.3, 0.3]]])
    logits = torch.full((1, 3, 3), -4.0)
    logits[0, 2, 1] = 4.0
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}]
    ((q_idx, t_idx),) = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert q_idx.tolist() == [2] and t_idx.tolist() == [0]


def test_zero_targets():
    outputs, targets = _case(4, [0, 0])
    indices = HungarianMatcher()(outputs, targets)
    assert [(len(q), len(t)) for q, t in indices] == [(0, 0), (0, 0)]
    assert all(q.dtype == torch.int64 for q, _ in indices)


@pytest.mark.parametrize("key", ["pred_logits", "pred_boxes"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_predictions_raise(key, bad):
    outputs, targets = _case(4, [2])
    outputs[key][0, 1, 0] = bad
    if key == "pred_logits" and bad == float("inf"):
        outputs[key][0, 1, :] = float("nan")  # +inf logits alone give a finite (saturated) cost
    with pytest.raises(DecodetError, match="non-finite predictions reached the matcher"):
        HungarianMatcher()(outputs, targets)


def test_one_to_many_repetition():
    outputs, targets = _case(7, [2, 3, 0], seed=3)
    indices = HungarianMatcher()(outputs, targets, k=3)
    for (q_idx, t_idx), n in zip(indices, [2, 3, 0]):
        assert len(q_idx) == min(7, 3 * n)
        assert len(set(q_idx.tolist())) == len(q_idx)
        counts = torch.bincount(t_idx, minlength=n).tolist() if n else []
        assert all(c <= 3 for c in counts) and sum(counts) == min(7, 3 * n)
        assert all(0 <= t < n for t in t_idx.tolist())
    # k = 2 with 2 targets and 4 queries: each target gets exactly two queries.
    (q_idx, t_idx), _, _ = HungarianMatcher()(outputs, targets, k=2)
    assert sorted(t_idx.tolist()) == [0, 0, 1, 1]


def test_match_groups_equals_separate_calls():
    first, targets = _case(5, [3, 2], seed=4)
    second, _ = _case(6, [3, 2], seed=5)
    matcher = HungarianMatcher(**COSTS)
    grouped = matcher.match_groups([first, second], targets)
    for outputs, got in zip([first, second], grouped):
        for (q1, t1), (q2, t2) in zip(got, matcher(outputs, targets)):
            assert torch.equal(q1, q2) and torch.equal(t1, t2)


def test_invalid_settings():
    with pytest.raises(DecodetError):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)
    outputs, targets = _case(3, [1])
    with pytest.raises(DecodetError):
        HungarianMatcher()(outputs, targets, k=0)
