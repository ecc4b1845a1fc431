"""Set criterion: hand-computed losses, the authors' normalisation, aux/one-to-many terms, presets."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou

from decodet.config import DecoConfig, DecoPlusConfig
from decodet.errors import DecodetError
from decodet.losses import HungarianMatcher, SetCriterion, build_criterion


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _iou_giou(a, b) -> tuple[float, float]:
    """IoU and GIoU of two cxcywh boxes, in plain Python."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union, inter / union - (hull - union) / hull


# One image, two queries, three classes, one target of class 2; query 0 is clearly the match.
LOGITS = [[0.5, -1.0, 1.5], [-2.0, 0.3, -0.7]]
BOXES = [[0.45, 0.5, 0.3, 0.2], [0.1, 0.9, 0.1, 0.1]]
TARGET_BOX = [0.5, 0.52, 0.25, 0.3]
LABEL = 2


def _tiny():
    outputs = {"pred_logits": torch.tensor([LOGITS], requires_grad=True), "pred_boxes": torch.tensor([BOXES])}
    targets = [{"labels": torch.tensor([LABEL]), "boxes": torch.tensor([TARGET_BOX])}]
    return outputs, targets


def _hand_box_terms() -> tuple[float, float]:
    l1 = sum(abs(p - t) for p, t in zip(BOXES[0], TARGET_BOX))
    return l1, 1 - _iou_giou(BOXES[0], TARGET_BOX)[1]


def test_focal_terms_by_hand():
    outputs, targets = _tiny()
    losses = build_criterion(DecoConfig())(outputs, targets)
    alpha, gamma, focal = 0.25, 2.0, 0.0
    for q in range(2):
        for c in range(3):
            p = _sigmoid(LOGITS[q][c])
            if (q, c) == (0, LABEL):
                focal += -alpha * (1 - p) ** gamma * math.log(p)
            else:
                focal += -(1 - alpha) * p**gamma * math.log(1 - p)
    l1, giou_loss = _hand_box_terms()
    assert losses["loss_focal"].item() == pytest.approx(2 * focal, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(5 * l1, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(2 * giou_loss, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(2 * focal + 5 * l1 + 2 * giou_loss, rel=1e-5)


def test_varifocal_terms_by_hand():
    outputs, targets = _tiny()
    losses = build_criterion(DecoPlusConfig())(outputs, targets)
    alpha, gamma, vfl = 0.75, 2.0, 0.0
    iou = _iou_giou(BOXES[0], TARGET_BOX)[0]
    for q in range(2):
        for c in range(3):
            p = _sigmoid(LOGITS[q][c])
            if (q, c) == (0, LABEL):  # target and weight are the IoU
                vfl += iou * -(iou * math.log(p) + (1 - iou) * math.log(1 - p))
            else:  # target 0, weight alpha p^gamma
                vfl += alpha * p**gamma * -math.log(1 - p)
    l1, giou_loss = _hand_box_terms()
    assert set(losses) == {"loss_vfl", "loss_bbox", "loss_giou", "loss"}
    assert losses["loss_vfl"].item() == pytest.approx(vfl, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(5 * l1, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(2 * giou_loss, rel=1e-5)


def test_matchability_aware_terms_by_hand():
    """DEIM's MAL: target IoU**gamma at weight 1 for the match, p**gamma (times alpha 1) elsewhere."""
    outputs, targets = _tiny()
    losses = build_criterion(DecoConfig(), class_loss="mal", weight_class=3)(outputs, targets)
    gamma, mal = 2.0, 0.0
    iou = _iou_giou(BOXES[0], TARGET_BOX)[0]
    for q in range(2):
        for c in range(3):
            p = _sigmoid(LOGITS[q][c])
            if (q, c) == (0, LABEL):
                t = iou**gamma
                mal += -(t * math.log(p) + (1 - t) * math.log(1 - p))
            else:
                mal += p**gamma * -math.log(1 - p)
    assert set(losses) == {"loss_mal", "loss_bbox", "loss_giou", "loss"}
    assert losses["loss_mal"].item() == pytest.approx(3 * mal, rel=1e-5)
    losses["loss"].backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all() and outputs["pred_logits"].grad.abs().sum() > 0
    # a name wins over use_vfl; an unknown one is refused in one line
    assert build_criterion("deco_r18", use_vfl=True, class_loss="focal").class_loss == "focal"
    with pytest.raises(DecodetError, match="unknown class loss"):
        build_criterion("deco_r18", class_loss="hinge")


def _batch(seed: int = 0, batch: int = 3, queries: int = 6, classes: int = 4, sizes=(2, 0, 3), aux: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def boxes(*shape):
        wh = 0.05 + 0.4 * torch.rand(*shape, 2, generator=gen)
        return torch.cat([wh / 2 + (1 - wh) * torch.rand(*shape, 2, generator=gen), wh], dim=-1)

    def group():
        return {
            "pred_logits": (torch.randn(batch, queries, classes, generator=gen) * 2).requires_grad_(),
            "pred_boxes": boxes(batch, queries).requires_grad_(),
        }

    outputs = group()
    outputs["aux_outputs"] = [group() for _ in range(aux)]
    targets = [{"labels": torch.randint(0, classes, (n,), generator=gen), "boxes": boxes(n)} for n in sizes]
    return outputs, targets


def _authors_total(outputs, targets, matcher, use_vfl: bool, weights, alpha: float) -> float:
    """The authors' weighted total, written the way their criteria compute it (per-class mean over queries
    times Q, pairwise GIoU diagonal)."""
    num_boxes = max(sum(len(t["labels"]) for t in targets), 1)
    total = 0.0
    for group in [outputs, *outputs.get("aux_outputs", [])]:
        logits, boxes = group["pred_logits"].detach(), group["pred_boxes"].detach()
        indices = matcher(group, targets)
        b_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)])
        q_idx = torch.cat([q for q, _ in indices])
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
        src = boxes[b_idx, q_idx]
        onehot = torch.zeros_like(logits)
        onehot[b_idx, q_idx, labels] = 1
        giou = torch.diag(generalized_box_iou(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy")))
        if use_vfl:
            iou = giou.new_tensor([_iou_giou(s, t)[0] for s, t in zip(src.tolist(), tgt.tolist())])
            score = torch.zeros_like(logits)
            score[b_idx, q_idx, labels] = iou
            weight = alpha * logits.sigmoid().pow(2) * (1 - onehot) + score
            cls = F.binary_cross_entropy_with_logits(logits, score, weight=weight, reduction="none")
        else:
            p = logits.sigmoid()
            ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
            p_t = p * onehot + (1 - p) * (1 - onehot)
            cls = (alpha * onehot + (1 - alpha) * (1 - onehot)) * ce * (1 - p_t) ** 2
        cls = cls.mean(1).sum() * logits.shape[1] / num_boxes
        total += weights[0] * cls.item()
        total += weights[1] * F.l1_loss(src, tgt, reduction="none").sum().item() / num_boxes
        total += weights[2] * (1 - giou).sum().item() / num_boxes
    return total


@pytest.mark.parametrize(
    ("config", "use_vfl", "weights", "alpha"),
    [
        (DecoConfig(), False, (2, 5, 2), 0.25),
        (DecoPlusConfig(), True, (1, 5, 2), 0.75),
    ],
)
def test_total_matches_authors_formula(config, use_vfl, weights, alpha):
    outputs, targets = _batch(seed=1, aux=2)
    criterion = build_criterion(config)
    losses = criterion(outputs, targets)
    expected = _authors_total(outputs, targets, criterion.matcher, use_vfl, weights, alpha)
    assert losses["loss"].item() == pytest.approx(expected, rel=1e-5)
    terms = [v for k, v in losses.items() if k != "loss"]
    assert losses["loss"].item() == pytest.approx(sum(t.item() for t in terms), rel=1e-6)


def test_aux_names_counts_and_gradients():
    outputs, targets = _batch(seed=2, aux=5)
    losses = build_criterion("deco_r18")(outputs, targets)
    expected = {f"loss_{n}{s}" for n in ("focal", "bbox", "giou") for s in ["", *(f"_aux{i}" for i in range(5))]}
    assert set(losses) == expected | {"loss"}
    losses["loss"].backward()
    for group in [outputs, *outputs["aux_outputs"]]:
        assert group["pred_logits"].grad is not None and group["pred_logits"].grad.abs().sum() > 0
        assert group["pred_boxes"].grad is not None and group["pred_boxes"].grad.abs().sum() > 0
        assert torch.isfinite(group["pred_boxes"].grad).all()


def test_decoplus_encoder_aux_is_supervised_like_a_layer():
    # DECO+ lists the encoder's top-k as the last aux output: it gets the same three terms.
    outputs, targets = _batch(seed=3, aux=3)
    losses = build_criterion("decoplus_r18")(outputs, targets)
    assert {k for k in losses if k.endswith("_aux2")} == {"loss_vfl_aux2", "loss_bbox_aux2", "loss_giou_aux2"}
    alone = build_criterion("decoplus_r18")(outputs["aux_outputs"][2], targets)
    assert losses["loss_vfl_aux2"].item() == pytest.approx(alone["loss_vfl"].item(), rel=1e-6)


def test_zero_targets_and_empty_batch():
    outputs, targets = _batch(seed=4, sizes=(0, 0, 0), aux=1)
    losses = build_criterion("deco_r50")(outputs, targets)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    assert losses["loss_focal"].item() > 0  # every query is a negative, normalised by max(0, 1) = 1
    losses["loss"].backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0


def test_half_precision_predictions():
    outputs, targets = _batch(seed=5)
    half = {k: v.detach().bfloat16() for k, v in outputs.items() if k != "aux_outputs"}
    losses = build_criterion("decoplus_r18")(half, targets)
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])


def test_bad_targets_and_nan_predictions():
    criterion = build_criterion("deco_r18")
    outputs, targets = _batch(seed=6)
    bad = [dict(t) for t in targets]
    bad[0]["labels"] = torch.tensor([0, 4])  # 4 classes: 4 is out of range
    with pytest.raises(DecodetError, match="labels must lie in"):
        criterion(outputs, bad)
    with pytest.raises(DecodetError, match="targets were given"):
        criterion(outputs, targets[:2])
    bad = [dict(t) for t in targets]
    bad[2]["boxes"] = torch.zeros(3, 5)
    with pytest.raises(DecodetError, match="boxes"):
        criterion(outputs, bad)
    outputs["pred_boxes"] = outputs["pred_boxes"].detach().clone()
    outputs["pred_boxes"][1, 2, 0] = float("nan")
    with pytest.raises(DecodetError, match="non-finite"):
        criterion(outputs, targets)


def test_one_to_many_branch():
    one2one, targets = _batch(seed=7, queries=5)
    one2many, _ = _batch(seed=8, queries=12, aux=1)
    outputs = dict(one2one)
    outputs["pred_logits_o2m"] = one2many["pred_logits"]
    outputs["pred_boxes_o2m"] = one2many["pred_boxes"]
    outputs["aux_outputs_o2m"] = one2many["aux_outputs"]
    k, scale = 3, 0.5
    losses = build_criterion("decoplus_r18", one_to_many=k, o2m_weight=scale)(outputs, targets)
    assert {n for n in losses if "o2m" in n} == {
        f"loss_{n}{s}" for n in ("vfl", "bbox", "giou") for s in ("_o2m", "_o2m_aux0")
    }
    # Same as the plain criterion on the one-to-many queries with every target repeated k times.
    repeated = [{"labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]
    plain = build_criterion("decoplus_r18")(one2many, repeated)
    for name in ("loss_vfl", "loss_bbox", "loss_giou", "loss_vfl_aux0"):
        o2m_name = name.replace("_aux0", "_o2m_aux0") if "aux" in name else name + "_o2m"
        assert losses[o2m_name].item() == pytest.approx(scale * plain[name].item(), rel=1e-5)
    # The one-to-one terms are unchanged, and the default criterion ignores the extra group.
    default = build_criterion("decoplus_r18")(outputs, targets)
    assert set(default) == {"loss", "loss_vfl", "loss_bbox", "loss_giou"}
    assert losses["loss_bbox"].item() == pytest.approx(default["loss_bbox"].item())


def test_build_criterion_presets_and_overrides():
    deco = build_criterion("deco_r50")
    assert deco.class_loss == "focal" and deco.alpha == 0.25
    assert deco.weights == {"loss_focal": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    assert (deco.matcher.cost_class, deco.matcher.cost_bbox, deco.matcher.cost_giou) == (1.0, 5.0, 2.0)
    plus = build_criterion(DecoPlusConfig())
    assert plus.class_loss == "vfl" and plus.alpha == 0.75 and plus.weights["loss_vfl"] == 1.0
    assert (plus.matcher.cost_class, plus.matcher.alpha, plus.matcher.gamma) == (2.0, 0.25, 2.0)
    iou_aware = build_criterion("deco_r18", use_vfl=True, weight_bbox=4)
    assert iou_aware.class_loss == "vfl" and iou_aware.alpha == 0.75 and iou_aware.weights["loss_bbox"] == 4.0
    assert isinstance(iou_aware, SetCriterion) and isinstance(iou_aware.matcher, HungarianMatcher)
    with pytest.raises(DecodetError, match="unknown criterion option"):
        build_criterion("deco_r18", weight_focal=3)
    with pytest.raises(DecodetError):
        build_criterion("no_such_model")
    with pytest.raises(DecodetError):
        build_criterion(42)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_normalisation_single_process():
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    outputs, targets = _batch(seed=9, aux=1)
    criterion = build_criterion("deco_r18")
    local = criterion(outputs, targets)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        distributed = criterion(outputs, targets)
    finally:
        dist.destroy_process_group()
    for name, value in local.items():
        assert distributed[name].item() == pytest.approx(value.item(), rel=1e-6)
