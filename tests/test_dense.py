"""Dense one-to-many supervision of DECO+'s encoder head (decodet.losses.dense): the assignment, the terms,
training only, no new parameters."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_convert, box_iou

from decodet.errors import DecodetError
from decodet.losses import build_criterion
from decodet.losses.dense import dense_assign
from decodet.registry import build_model

BOXES = torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.2, 0.7, 0.02, 0.02], [0.75, 0.25, 0.2, 0.2]])


def _grid(shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor centres [N, 2] and level cells [N, 2] of levels ``shapes`` (finest first), row-major."""
    centres, cells = [], []
    for h, w in shapes:
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        centres.append((torch.stack([xs, ys], -1).reshape(-1, 2) + 0.5) / torch.tensor([w, h]))
        cells.append(torch.tensor([1 / w, 1 / h]).expand(h * w, 2))
    return torch.cat(centres), torch.cat(cells)


def _targets(n: tuple[int, ...] = (3, 0)) -> list[dict[str, torch.Tensor]]:
    return [{"labels": torch.arange(k) % 4, "boxes": BOXES[:k]} for k in n]


def test_each_box_gets_at_most_k_positions_near_it_and_each_position_one_box() -> None:
    torch.manual_seed(0)
    shapes = [(16, 16), (8, 8), (4, 4)]
    centres, cells = _grid(shapes)
    n = centres.shape[0]
    boxes = torch.cat([centres, torch.rand(n, 2) * 0.3 + 0.02], dim=-1)[None].repeat(2, 1, 1)
    logits = torch.randn(2, n, 4)
    valid = torch.ones(n, dtype=torch.bool)
    valid[:3] = False  # invalid positions are never assigned
    k = 6
    indices = dense_assign(logits, boxes, centres, cells, valid, _targets(), k)
    positions, which = indices[0]
    assert indices[1][0].numel() == 0 and indices[1][1].numel() == 0  # an image without boxes: nothing
    assert len(set(positions.tolist())) == len(positions)  # a position serves one box
    assert not valid[positions].logical_not().any()
    for t in range(3):
        mine = positions[which == t]
        assert 1 <= len(mine) <= k  # even the 0.02-wide box, smaller than any cell, gets a position
        box = BOXES[t]
        reach = torch.maximum(box[2:] / 2, cells[mine])
        assert ((centres[mine] - box[:2]).abs() < reach).all()
    # the tiny box's positions are its nearest cells, whatever the predictions
    tiny = positions[which == 1]
    assert ((centres[tiny] - BOXES[1, :2]).abs() < cells[tiny]).all()


def test_the_best_aligned_candidates_win() -> None:
    """Among the candidates, the positions whose predicted box overlaps the target most (at equal scores)."""
    shapes = [(8, 8)]
    centres, cells = _grid(shapes)
    n = centres.shape[0]
    box = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    boxes = torch.cat([centres, torch.full((n, 2), 0.1)], dim=-1)[None]  # small boxes: low IoU
    good = [27, 28, 35]  # three candidates predict the target's box
    boxes[0, good] = box
    logits = torch.zeros(1, n, 2)
    targets = [{"labels": torch.tensor([1]), "boxes": box}]
    ((positions, _),) = dense_assign(logits, boxes, centres, cells, torch.ones(n, dtype=torch.bool), targets, 3)
    assert sorted(positions.tolist()) == good
    iou = box_iou(box_convert(box, "cxcywh", "xyxy"), box_convert(boxes[0], "cxcywh", "xyxy"))[0]
    assert (iou[good] > 0.99).all()


def test_the_dense_head_trains_only_and_leaves_the_model_as_it_was() -> None:
    """``dense_aux`` adds a separate, training-only head and changes no prediction: with the authors' weights
    shared, the outputs are the same with and without it; only training outputs carry the dense predictions."""
    torch.manual_seed(0)
    plain = build_model("deco_tiny", num_classes=5).train()
    torch.manual_seed(0)
    dense = build_model("deco_tiny", num_classes=5, dense_aux=8).train()
    # the published parameters start equal: the dense head draws its random numbers after them
    theirs = dense.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in plain.state_dict().items())
    missing, unexpected = dense.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("decoder.dense_head.") for k in missing)
    images = torch.rand(2, 3, 160, 160)
    a, b = plain(images), dense(images)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])
    enc = b["enc_dense"]
    positions = 20 * 20 + 10 * 10 + 5 * 5  # strides 8, 16, 32 of a 160 px image
    assert enc["pred_logits"].shape == (2, positions, 5) and enc["pred_boxes"].shape == (2, positions, 4)
    assert enc["centres"].shape == enc["cells"].shape == (positions, 2) and enc["valid"].shape == (positions,)
    # its head starts where the selection head does: boxes on the anchors, scores about the 0.01 prior
    valid = enc["valid"]
    assert torch.allclose(enc["pred_boxes"][:, valid, :2], enc["centres"][valid].expand(2, -1, -1), atol=1e-5)
    assert torch.allclose(enc["pred_boxes"][:, :400, 2:], torch.full((2, 400, 2), 0.05), atol=1e-5)
    assert 0.005 < enc["pred_logits"].sigmoid().mean() < 0.02
    with torch.no_grad():
        assert set(dense.eval()(images)) == {"pred_logits", "pred_boxes"}
        assert torch.equal(dense(images)["pred_boxes"], plain.eval()(images)["pred_boxes"])
    with pytest.raises(DecodetError, match="dense_aux"):
        build_model("deco_tiny", num_classes=5, dense_aux=-1)


def test_dense_terms_supervise_the_assigned_positions_and_train_the_encoder_head() -> None:
    torch.manual_seed(0)
    model = build_model("deco_tiny", num_classes=4, dense_aux=8).train()
    criterion = build_criterion(model.config, dense_weight=2.0)
    assert criterion.dense_aux == 8  # read from the model's config
    images = torch.rand(2, 3, 160, 160)
    outputs = model(images)
    losses = criterion(outputs, _targets())
    assert {"loss_vfl_dense", "loss_bbox_dense", "loss_giou_dense"} <= set(losses)
    off = build_criterion(model.config, dense_aux=0)(outputs, _targets())
    assert "loss_vfl_dense" not in off
    dense_sum = sum(v for n, v in losses.items() if n.endswith("_dense"))
    assert losses["loss"].item() == pytest.approx(off["loss"].item() + dense_sum.item(), rel=1e-5)
    # the weight scales the terms: 2x the unit-weight criterion's
    unit = build_criterion(model.config)(outputs, _targets())
    assert losses["loss_giou_dense"].item() == pytest.approx(2 * unit["loss_giou_dense"].item(), rel=1e-5)
    losses["loss"].backward()
    grads = [p.grad for p in model.decoder.dense_head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # the dense terms reach the encoder (the point of the head) but not the top-k selection's own head
    model.zero_grad()
    again = criterion(model(images), _targets())
    sum(v for n, v in again.items() if n.endswith("_dense")).backward()
    assert model.encoder.parameters().__next__().grad is not None
    assert all(p.grad is None or not p.grad.any() for p in model.decoder.enc_score_head.parameters())


def test_a_criterion_with_dense_aux_and_a_model_without_warns_and_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = build_model("deco_tiny", num_classes=4).train()
    criterion = build_criterion(model.config, dense_aux=4)
    losses = criterion(model(torch.rand(1, 3, 160, 160)), _targets((2,)))
    assert "loss_vfl_dense" not in losses and "enc_dense" in caplog.text
