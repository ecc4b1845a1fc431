"""Denoising queries (decodet.models.denoising): the noise, the separate grid, the losses, training only."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_convert

from decodet.errors import DecodetError
from decodet.losses import build_criterion
from decodet.models.denoising import denoising_queries
from decodet.registry import build_model

BOXES = torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1], [0.7, 0.3, 0.3, 0.2]])


def _targets(n: tuple[int, ...] = (3, 0)) -> list[dict[str, torch.Tensor]]:
    return [{"labels": torch.arange(k) % 4, "boxes": BOXES[:k]} for k in n]


def test_slots_alternate_positives_and_negatives_in_whole_groups() -> None:
    torch.manual_seed(0)
    shapes = [(8, 8), (4, 4), (2, 2)]
    memory = torch.randn(2, sum(h * w for h, w in shapes), 16)
    content, ref_unact, positives = denoising_queries(_targets(), 20, memory, shapes, 0.05)
    assert content.shape == (2, 20, 16) and ref_unact.shape == (2, 20, 4) and not content.requires_grad
    queries, which = positives[0]
    # 3 boxes: groups of 6 slots, 3 whole groups in 20 (slots 18, 19 are extra negatives)
    assert queries.tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14] and which.tolist() == [0, 1, 2] * 3
    assert positives[1][0].numel() == 0  # no boxes, no positives
    assert torch.isfinite(ref_unact).all()
    # a query's content is the encoder's feature at its box's centre, on the level of the nearest anchor size
    for slot, box in enumerate(ref_unact[0].sigmoid()):
        level = min(max(round(math.log2(float(box[2:].max()) / 0.05)), 0), 2)
        (h, w), offset = shapes[level], [0, 64, 80][level]
        assert torch.equal(content[0, slot], memory[0, offset + int(box[1] * h) * w + int(box[0] * w)])


def test_positives_move_under_half_a_side_and_negatives_one_to_two_halves() -> None:
    """DINO's contrastive noise: a positive's sides move by less than half the box's size, a negative's by
    one to two halves (where its sides cross, the box is re-sorted, so some sides then read as nearer)."""
    torch.manual_seed(0)
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])  # far enough from the edges that nothing is clipped
    memory = torch.randn(1, 64 + 16 + 4, 8)
    targets, shapes = [{"labels": torch.tensor([1]), "boxes": box}], [(8, 8), (4, 4), (2, 2)]
    _, ref_unact, positives = denoising_queries(targets, 400, memory, shapes, 0.05)
    moved = (box_convert(ref_unact[0].sigmoid(), "cxcywh", "xyxy") - box_convert(box, "cxcywh", "xyxy")).abs() / 0.1
    is_pos = torch.zeros(400, dtype=torch.bool)
    is_pos[positives[0][0]] = True
    assert is_pos.sum() == 200
    assert (moved[is_pos] < 1 + 1e-4).all() and moved[is_pos].mean() == pytest.approx(0.5, abs=0.05)
    assert (moved[~is_pos] < 2 + 1e-4).all()
    assert 0.65 < (moved[~is_pos] > 1 - 1e-4).float().mean() < 0.85  # a quarter of the side pairs cross


def test_more_boxes_than_half_the_grid_take_a_subset() -> None:
    torch.manual_seed(0)
    shapes = [(4, 4), (2, 2), (1, 1)]
    memory = torch.randn(1, 21, 8)
    many = [{"labels": torch.zeros(7, dtype=torch.long), "boxes": BOXES[[0, 1, 2, 0, 1, 2, 0]]}]
    _, _, positives = denoising_queries(many, 8, memory, shapes, 0.05)
    queries, which = positives[0]
    assert queries.tolist() == [0, 1, 2, 3] and len(set(which.tolist())) == 4


def test_the_denoising_grid_trains_only_and_never_changes_the_matched_queries() -> None:
    """Convolutions never mix batch entries: with the same weights, the one-to-one predictions in training
    are the same with the denoising grid as without it; evaluation has no denoising outputs at all."""
    torch.manual_seed(0)
    plain = build_model("deco_tiny", num_classes=5).train()
    with_dn = build_model("deco_tiny", num_classes=5, denoising=2).train()
    with_dn.load_state_dict(plain.state_dict())  # the same parameters: denoising adds none
    images, targets = torch.rand(2, 3, 160, 160), _targets()
    a, b = plain(images), with_dn(images, targets)
    assert torch.allclose(a["pred_logits"], b["pred_logits"], atol=1e-5)
    assert torch.allclose(a["pred_boxes"], b["pred_boxes"], atol=1e-6)
    assert len(b["dn_outputs"]) == 2 and len(b["dn_outputs"][0]["aux_outputs"]) == with_dn.config.num_decoder_layers - 1
    assert b["dn_outputs"][0]["pred_logits"].shape == a["pred_logits"].shape
    assert "dn_outputs" not in with_dn(images)  # no targets: nothing to denoise
    with torch.no_grad():
        assert set(with_dn.eval()(images, targets)) == {"pred_logits", "pred_boxes"}
    with pytest.raises(DecodetError, match="denoising"):
        build_model("deco_tiny", num_classes=5, denoising=-1)


def test_denoising_terms_supervise_each_positive_on_its_own_box() -> None:
    """A denoising grid whose positives predict their boxes exactly has zero box terms; moving one positive
    raises them; every denoising query that is not a positive is background for the class term."""
    num_classes, q = 4, 6
    targets = _targets((2,))
    positives = [(torch.tensor([0, 1]), torch.tensor([0, 1]))]
    boxes = torch.full((1, q, 4), 0.5)
    boxes[0, :2] = BOXES[:2]
    logits = torch.full((1, q, num_classes), -4.0)
    grid = {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": []}
    plain = {"pred_logits": torch.full((1, 3, num_classes), -4.0), "pred_boxes": torch.full((1, 3, 4), 0.5)}
    criterion = build_criterion("deco_tiny", dn_weight=2.0)
    exact = criterion({**plain, "dn_outputs": [grid], "dn_positives": [positives]}, targets)
    assert exact["loss_bbox_dn"].item() == pytest.approx(0, abs=1e-6)
    assert exact["loss_giou_dn"].item() == pytest.approx(0, abs=1e-6)
    assert exact["loss"].item() > criterion(plain, targets)["loss"].item()  # the class term counts
    moved = boxes.clone()
    moved[0, 1, 0] += 0.05
    off = criterion({**plain, "dn_outputs": [{**grid, "pred_boxes": moved}], "dn_positives": [positives]}, targets)
    # L1 weight 5, dn_weight 2, the 0.05 over 2 positives
    assert off["loss_bbox_dn"].item() == pytest.approx(5 * 2 * 0.05 / 2, rel=1e-4)


def test_training_with_denoising_runs_end_to_end() -> None:
    torch.manual_seed(0)
    model = build_model("deco_tiny", num_classes=4, denoising=1).train()
    criterion = build_criterion(model.config)
    losses = criterion(model(torch.rand(2, 3, 160, 160), _targets()), _targets())
    losses["loss"].backward()
    assert "loss_vfl_dn" in losses and "loss_giou_dn_aux0" in losses
    grads = [p.grad for p in model.decoder.dec_bbox_head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
