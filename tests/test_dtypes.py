"""Models, losses and matching in float64 (gradient checks need it) and under CPU bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from decodet.losses import build_criterion
from decodet.losses.matcher import HungarianMatcher
from decodet.registry import build_model

# Small members of both architectures (the published layouts, narrower and shallower).
SMALL = {
    "deco_r18": {"d_model": 64, "encoder_dims": (16, 32, 64), "encoder_depths": (1, 1, 1), "num_decoder_layers": 2},
    "deco_tiny": {"backbone_width": 16, "hidden_dim": 64, "query_grid": (4, 4), "num_top_queries": 16},
}


def _targets(dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
    boxes = [[[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]], [[0.5, 0.5, 0.4, 0.4]]]
    labels = [[0, 2], [1]]
    return [
        {"boxes": torch.tensor(b, dtype=dtype), "labels": torch.tensor(lab, dtype=torch.int64)}
        for b, lab in zip(boxes, labels)
    ]


def _loss_and_grads(model: torch.nn.Module, images: torch.Tensor, targets) -> tuple[torch.Tensor, list]:
    criterion = build_criterion(model.config)
    loss = criterion(model.train()(images), targets)["loss"]
    loss.backward()
    return loss, [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float64])
def test_float64_model_loss_and_matching(name: str, target_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, **SMALL[name]).double()
    loss, grads = _loss_and_grads(model, torch.rand(2, 3, 64, 64, dtype=torch.float64), _targets(target_dtype))
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    assert grads and all(g.dtype == torch.float64 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_default_dtype_float64(name: str) -> None:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = build_model(name, num_classes=3, **SMALL[name])
        assert next(model.parameters()).dtype == torch.float64
        loss, _ = _loss_and_grads(model, torch.rand(2, 3, 64, 64), _targets())
        assert loss.dtype == torch.float64 and torch.isfinite(loss)
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_bf16_autocast_forward_loss_backward(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, **SMALL[name])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(model, torch.rand(2, 3, 64, 64), _targets())
    assert torch.isfinite(loss) and grads
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)  # master weights stay fp32


def test_matcher_same_assignment_in_float32_and_float64() -> None:
    torch.manual_seed(0)
    logits, boxes = torch.randn(2, 12, 3), torch.rand(2, 12, 4) * 0.5 + 0.25
    targets = _targets()
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    single = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    double = matcher({"pred_logits": logits.double(), "pred_boxes": boxes.double()}, _targets(torch.float64))
    for (q32, t32), (q64, t64) in zip(single, double):
        assert torch.equal(q32, q64) and torch.equal(t32, t64)


# DECO's focal criterion is checked whole; DECO+'s varifocal term uses the detached IoU as its
# target by design (a stop-gradient), so only its box terms are checked.
@pytest.mark.parametrize("arch, terms", [("deco_r18", ("loss",)), ("deco_tiny", ("loss_bbox", "loss_giou"))])
def test_criterion_gradcheck_float64(arch: str, terms: tuple[str, ...]) -> None:
    """The set loss is differentiable in the predictions (the matching is piecewise constant, so the
    finite differences stay inside one assignment for a small step)."""
    criterion = build_criterion(arch)
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    boxes = (torch.rand(2, 6, 4, dtype=torch.float64) * 0.4 + 0.3).requires_grad_()
    targets = _targets(torch.float64)

    def loss_fn(lg: torch.Tensor, bx: torch.Tensor) -> torch.Tensor:
        losses = criterion({"pred_logits": lg, "pred_boxes": bx}, targets)
        return sum(losses[t] for t in terms)

    assert torch.autograd.gradcheck(loss_fn, (logits, boxes), eps=1e-6, atol=1e-5, rtol=1e-4)
