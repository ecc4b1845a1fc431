"""DECO+ model: shapes, the authors' parameter layout, deploy fusion, gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import read_reference
from decodet.errors import DecodetError
from decodet.losses import build_criterion
from decodet.models.decoplus import DECOPlus, InceptionDWConv2d, make_anchors
from decodet.models.hybrid_encoder import RepVggBlock
from decodet.registry import build_model, get_config

# The authors' ResNet-50 setting: frozen batch norm in the backbone, stem frozen.
R50_OVERRIDES = {"freeze_backbone_bn": True, "freeze_at": 0}


def all_outputs_sum(out: dict) -> torch.Tensor:
    total = out["pred_logits"].sum() + out["pred_boxes"].sum()
    for aux in out.get("aux_outputs", []):
        total = total + aux["pred_logits"].sum() + aux["pred_boxes"].sum()
    return total


@pytest.fixture(scope="module")
def tiny() -> DECOPlus:
    torch.manual_seed(0)
    return build_model("deco_tiny", num_classes=7)


@pytest.mark.parametrize("size", [(160, 160), (200, 301)])
def test_deco_tiny_shapes_eval_and_train(tiny: DECOPlus, size: tuple[int, int]) -> None:
    images = torch.rand(2, 3, *size)
    tiny.eval()
    with torch.no_grad():
        out = tiny(images)
    assert set(out) == {"pred_logits", "pred_boxes"}
    assert out["pred_logits"].shape == (2, 100, 7)
    assert out["pred_boxes"].shape == (2, 100, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    tiny.train()
    out = tiny(images)
    assert out["pred_logits"].shape == (2, 100, 7) and out["pred_boxes"].shape == (2, 100, 4)
    assert len(out["aux_outputs"]) == tiny.config.num_decoder_layers
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 100, 7) and aux["pred_boxes"].shape == (2, 100, 4)
    tiny.eval()


def test_decoplus_r18_shapes_odd_size() -> None:
    torch.manual_seed(0)
    model = build_model("decoplus_r18").eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 128, 128))
        assert out["pred_logits"].shape == (1, 300, 80) and out["pred_boxes"].shape == (1, 300, 4)
        out = model.train()(torch.rand(2, 3, 136, 201))
    assert out["pred_logits"].shape == (2, 300, 80)
    assert len(out["aux_outputs"]) == 3  # 2 decoder layers + the encoder's top-k


def test_aux_layout_last_entry_is_encoder_topk(tiny: DECOPlus) -> None:
    tiny.train()
    x = torch.rand(1, 3, 128, 160)
    out = tiny(x)
    tiny.eval()
    aux = out["aux_outputs"]
    assert len(aux) == tiny.config.num_decoder_layers  # (L - 1) decoder layers + 1 encoder entry
    # The encoder entry holds the top-k selection: in the "score" layout (the published one)
    # its best class logit is sorted descending; deco_tiny's "spatial" layout holds the same set.
    torch.manual_seed(0)
    scored = build_model("deco_tiny", num_classes=7, query_layout="score")
    scored.load_state_dict(tiny.state_dict())
    best_scored = scored.train()(x)["aux_outputs"][-1]["pred_logits"].max(-1).values[0]
    assert (best_scored[:-1] >= best_scored[1:]).all()
    best = aux[-1]["pred_logits"].max(-1).values[0]
    torch.testing.assert_close(best.sort(descending=True).values, best_scored)
    # The decoder entries are not: they are per-query refinements.
    assert not torch.equal(aux[0]["pred_logits"], aux[-1]["pred_logits"])


def test_train_and_eval_agree_on_the_last_layer(tiny: DECOPlus) -> None:
    """Training (batch norm frozen to eval) returns the same last layer as eval mode: the
    refined box through the undetached reference equals the eval box."""
    images = torch.rand(2, 3, 96, 128)
    tiny.eval()
    with torch.no_grad():
        ref = tiny(images)
        tiny.train()
        for m in tiny.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        out = tiny(images)
    tiny.eval()
    torch.testing.assert_close(out["pred_logits"], ref["pred_logits"])
    torch.testing.assert_close(out["pred_boxes"], ref["pred_boxes"])


@pytest.mark.parametrize(
    ("name", "overrides", "expected"),
    [("decoplus_r18", {}, 22_231_344), ("decoplus_r50", R50_OVERRIDES, 45_179_308)],
)
def test_parameter_counts(name: str, overrides: dict, expected: int) -> None:
    model = build_model(name, num_classes=80, **overrides)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize(("name", "overrides"), [("decoplus_r18", {}), ("decoplus_r50", R50_OVERRIDES)])
def test_state_dict_matches_authors_table(name: str, overrides: dict) -> None:
    model = build_model(name, num_classes=80, **overrides)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == read_reference(name)


def test_authors_state_dict_loads_strict_and_runs() -> None:
    torch.manual_seed(0)
    table = read_reference("decoplus_r18")
    state = {}
    for key, shape in table.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape) + 0.5
        else:
            state[key] = torch.randn(shape) * 0.02
    model = build_model("decoplus_r18").eval()
    model.load_state_dict(state, strict=True)
    loaded = model.state_dict()
    for key in ("decoder.decoder.layers.2.dwconv1.dwconv_w.weight", "encoder.fpn_blocks.1.conv3.norm.running_var"):
        assert torch.equal(loaded[key], state[key])
    with torch.no_grad():
        out = model(torch.rand(1, 3, 128, 128))
    assert torch.isfinite(out["pred_logits"]).all() and torch.isfinite(out["pred_boxes"]).all()


def _randomise_batch_norms(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)


def test_deploy_parity_with_random_batch_norm_statistics() -> None:
    """Full-model parity in float64, where rounding cannot reorder near-tied top-k scores
    of a random-weight model; the fused convs are exercised all the same."""
    torch.manual_seed(0)
    model = build_model("deco_tiny", num_classes=5)
    _randomise_batch_norms(model)
    model = model.double().eval()
    images = torch.rand(1, 3, 128, 160, dtype=torch.float64)
    with torch.no_grad():
        ref = model(images)
        assert model.deploy() is model
        out = model(images)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(
        blk.conv is not None and not hasattr(blk, "conv1") for blk in model.modules() if isinstance(blk, RepVggBlock)
    )
    assert (out["pred_logits"] - ref["pred_logits"]).abs().max() <= 1e-4
    assert (out["pred_boxes"] - ref["pred_boxes"]).abs().max() <= 1e-4


def test_deploy_parity_float32_features() -> None:
    """In float32 every fused map (backbone, encoder levels, decoder memory) stays within 1e-4."""
    torch.manual_seed(0)
    model = build_model("deco_tiny", num_classes=5)
    _randomise_batch_norms(model)
    model.eval()
    images = torch.rand(1, 3, 128, 160)

    def features() -> list[torch.Tensor]:
        levels = model.encoder(model.backbone(images))
        proj = [p(f) for p, f in zip(model.decoder.input_proj, levels)]
        return [*levels, *proj, model.decoder._merge_memory(proj)]

    with torch.no_grad():
        ref = features()
        model.deploy()
        out = features()
    for a, b in zip(ref, out):
        assert (a - b).abs().max() <= 1e-4


def test_gradients_reach_every_trainable_parameter() -> None:
    torch.manual_seed(0)
    model = build_model("deco_tiny", num_classes=4)
    # The last box layers start at zero, which blocks the gradient of the layers before
    # them at step 0; give them small weights so every path is exercised.
    with torch.no_grad():
        for head in [model.decoder.enc_bbox_head, *model.decoder.dec_bbox_head]:
            head.layers[-1].weight.normal_(0, 0.01)
    model.train()
    all_outputs_sum(model(torch.rand(2, 3, 96, 128))).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(list(model.parameters()))  # deco_tiny trains everything
    no_grad = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert no_grad == []


def test_r50_freeze_settings() -> None:
    model = build_model("decoplus_r50", **R50_OVERRIDES)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("backbone.conv1.") for n in frozen)


def test_initialisation_follows_authors() -> None:
    model = build_model("deco_tiny", num_classes=3)
    dec = model.decoder
    prior = -torch.log(torch.tensor(99.0))
    for head in [dec.enc_score_head, *dec.dec_score_head]:
        torch.testing.assert_close(head.bias, torch.full_like(head.bias, prior.item()))
    for head in [dec.enc_bbox_head, *dec.dec_bbox_head]:
        assert not head.layers[-1].weight.any() and not head.layers[-1].bias.any()
    assert torch.equal(dec.decoder.layers[0].gamma1, torch.full((128,), 1e-6))


def test_inception_dwconv_leaves_first_channels_untouched() -> None:
    conv = InceptionDWConv2d(16)
    x = torch.randn(1, 16, 5, 6)
    y = conv(x)
    assert torch.equal(y[:, :4], x[:, :4])
    torch.testing.assert_close(y[:, 4:8], conv.dwconv_hw(x[:, 4:8]))
    torch.testing.assert_close(y[:, 8:12], conv.dwconv_w(x[:, 8:12]))
    torch.testing.assert_close(y[:, 12:], conv.dwconv_h(x[:, 12:]))


def test_anchors_grid_and_invalid_border() -> None:
    anchors, valid = make_anchors([(80, 80), (40, 40), (20, 20)])
    assert anchors.shape == (1, 8400, 4) and valid.shape == (1, 8400, 1)
    # Level 0, cell (0, 0): centre 0.5 / 80 < 0.01 -> invalid and +inf.
    assert not valid[0, 0, 0] and torch.isinf(anchors[0, 0]).all()
    # Level 1, cell (y=2, x=3): centre (3.5 / 40, 2.5 / 40), size 0.1.
    box = torch.sigmoid(anchors[0, 6400 + 2 * 40 + 3])
    torch.testing.assert_close(box, torch.tensor([3.5 / 40, 2.5 / 40, 0.1, 0.1]))
    assert valid.sum() < 8400


def test_pretrained_backbone_missing_weights_is_a_clear_error(tmp_path: Path) -> None:
    cfg = get_config("decoplus_r18", pretrained_backbone=True, extra={"backbone_weights": str(tmp_path / "no.pth")})
    with pytest.raises(DecodetError, match="no.pth"):
        DECOPlus(cfg)
    with pytest.raises(DecodetError, match="width 32"):
        build_model("deco_tiny", pretrained_backbone=True)


def test_too_small_input_is_a_clear_error(tiny: DECOPlus) -> None:
    with pytest.raises(DecodetError, match="too small"):
        tiny(torch.rand(1, 3, 32, 32))


def test_hybrid_matching_group_trains_only_and_reaches_the_criterion():
    torch.manual_seed(0)
    model = build_model("deco_tiny", num_classes=5, one_to_many=3).train()
    out = model(torch.randn(2, 3, 160, 160))
    assert out["pred_logits_o2m"].shape == out["pred_logits"].shape
    assert len(out["aux_outputs_o2m"]) == model.config.num_decoder_layers - 1
    targets = [
        {"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]])}
    ] * 2
    losses = build_criterion(model.config)(out, targets)
    assert "loss_vfl_o2m" in losses and "loss_giou_o2m_aux0" in losses
    assert set(model.eval()(torch.randn(1, 3, 160, 160))) == {"pred_logits", "pred_boxes"}


@pytest.mark.parametrize("one_to_many", [0, 2])
def test_spatial_query_layout_orders_the_grid_by_box_centre(one_to_many: int) -> None:
    """``query_layout="spatial"`` keeps the same selected queries (per group), placed on the
    grid by reference-box centre: rows by y, each row by x."""
    torch.manual_seed(0)
    model = build_model("deco_tiny", num_classes=4, query_layout="spatial", one_to_many=one_to_many).train()
    dec = model.decoder
    seen = []
    original = dec._spatial_order

    def spy(index, coords, k):
        ordered = original(index, coords, k)
        seen.append((index, ordered, coords))
        return ordered

    dec._spatial_order = spy
    model(torch.rand(2, 3, 192, 192))
    index, ordered, coords = seen[0]
    qh, qw = dec.query_grid
    q = qh * qw
    assert ordered.shape == index.shape == (2, q * (2 if one_to_many else 1))
    for b in range(2):
        for g in range(ordered.shape[1] // q):
            group = slice(g * q, (g + 1) * q)
            assert sorted(ordered[b, group].tolist()) == sorted(index[b, group].tolist())  # same selection
            centre = coords[b, ordered[b, group], :2].reshape(qh, qw, 2)
            assert (centre[..., 0].diff(dim=1) >= 0).all()  # x ascending along each row
            assert (centre[..., 1].amax(dim=1)[:-1] <= centre[..., 1].amin(dim=1)[1:]).all()  # rows by y
    with pytest.raises(DecodetError, match="query_layout"):
        build_model("deco_tiny", num_classes=4, query_layout="random")
