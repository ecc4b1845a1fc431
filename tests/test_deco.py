"""DECO (single scale): shapes, published parameter counts, the authors' names, freezing."""

from __future__ import annotations

import pytest
import torch

import decodet
from conftest import read_reference
from decodet.errors import DecodetError
from decodet.io.checkpoint import ours_to_official
from decodet.models.layers import adaptive_max_pool2d

PUBLISHED = {"deco_r18": 43_988_082, "deco_r50": 56_460_402, "deco_convnext_tiny": 60_670_482}
TABLES = {"deco_r18": "deco_resnet18", "deco_r50": "deco_resnet50", "deco_convnext_tiny": "deco_convnext_tiny"}


def small_deco(**kw):
    cfg = dict(d_model=32, encoder_dims=(8, 16, 32), encoder_depths=(1, 1, 1), num_decoder_layers=2, query_grid=(3, 4))
    cfg.update(kw)
    return decodet.build_model("deco_r18", num_classes=5, **cfg)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_authors(name):
    with torch.device("meta"):
        model = decodet.build_model(name, num_classes=91)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(TABLES))
def test_state_dict_names_and_shapes_match_reference_after_conversion(name):
    with torch.device("meta"):
        model = decodet.build_model(name, num_classes=91)
    ours = {k: tuple(v.shape) for k, v in ours_to_official(model.state_dict()).items()}
    assert ours == read_reference(TABLES[name])


@pytest.mark.parametrize("size", [(64, 64), (97, 131), (200, 75)])
def test_output_shapes_any_size(size):
    model = small_deco().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out["pred_logits"].shape == (2, 12, 5)
    assert out["pred_boxes"].shape == (2, 12, 4)
    assert "aux_outputs" not in out
    assert (out["pred_boxes"] >= 0).all() and (out["pred_boxes"] <= 1).all()


def test_training_mode_has_aux_outputs_per_earlier_layer():
    model = small_deco(num_decoder_layers=3).train()
    out = model(torch.randn(1, 3, 64, 96))
    assert len(out["aux_outputs"]) == 2
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (1, 12, 5) and aux["pred_boxes"].shape == (1, 12, 4)


def test_real_preset_forward_odd_size():
    model = decodet.build_model("deco_r18", num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 150, 221))
    assert out["pred_logits"].shape == (1, 100, 7)


def test_gradients_reach_every_trainable_parameter_and_frozen_stay_frozen():
    model = small_deco().train()
    for head in model.box_heads:  # zero-initialised last layers would block gradients to the rest
        torch.nn.init.normal_(head.layers[-1].weight, std=0.1)
    out = model(torch.randn(2, 3, 64, 64))
    loss = out["pred_logits"].sum() + out["pred_boxes"].sum()
    loss = loss + sum(a["pred_logits"].sum() + a["pred_boxes"].sum() for a in out["aux_outputs"])
    loss.backward()
    unused = {"encoder.norm.weight", "encoder.norm.bias"}  # present in the authors' model, never applied
    for name, p in model.named_parameters():
        if name.startswith("backbone.body.") and not name.startswith(
            ("backbone.body.layer2", "backbone.body.layer3", "backbone.body.layer4")
        ):
            assert not p.requires_grad, name
            continue
        if name in unused:
            continue
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
    # frozen batch norm: buffers only, not parameters
    assert not any("bn" in n for n, _ in model.backbone.named_parameters())


def test_frozen_batch_norm_does_not_update_in_training():
    model = small_deco().train()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model(torch.randn(2, 3, 64, 64))
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_query_grid_is_row_major():
    model = small_deco(query_grid=(2, 3))
    grid = model._grid(model.query_pos, 1)
    w = model.query_pos.weight
    assert torch.equal(grid[0, :, 1, 2], w[1 * 3 + 2])
    assert torch.equal(grid[0, :, 0, 1], w[1])


@pytest.mark.parametrize(
    "bad, msg",
    [
        (torch.randn(3, 64, 64), "shape"),
        (torch.randn(1, 1, 64, 64), "shape"),
        (torch.randn(1, 4, 64, 64), "shape"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "float"),
    ],
)
def test_bad_input_is_a_clear_error(bad, msg):
    with pytest.raises(DecodetError, match=msg):
        small_deco().eval()(bad)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(DecodetError, match="unknown model 'deco_r1000'"):
        decodet.build_model("deco_r1000")
    with pytest.raises(DecodetError, match="unknown option"):
        decodet.build_model("deco_r18", no_such_option=3)


@pytest.mark.parametrize(
    "hw, out", [((25, 38), (10, 10)), ((40, 40), (15, 20)), ((20, 20), (10, 10)), ((7, 9), (10, 10))]
)
def test_export_path_of_adaptive_max_pool_equals_native(monkeypatch, hw, out):
    import decodet.models.layers as layers

    x = torch.randn(2, 3, *hw)
    native = adaptive_max_pool2d(x, out)
    monkeypatch.setattr(layers, "_exporting", lambda: True)
    assert torch.equal(layers.adaptive_max_pool2d(x, out), native)


def test_postprocess_top_k_labels_and_boxes_clipped_to_the_image():
    """Top-k over (query, class) pairs, category ids mapped, boxes in pixels clipped to the image."""
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 0, 1], logits[0, 2, 0] = 3.0, 1.0  # best: query 0 class 1, then query 2 class 0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.5, 0.5, 0.1, 0.1], [0.95, 0.1, 0.3, 0.4]]])
    (det,) = decodet.postprocess({"pred_logits": logits, "pred_boxes": boxes}, [(100, 200)], 2, [7, 9])
    assert det["labels"].tolist() == [9, 7]
    torch.testing.assert_close(det["scores"], torch.sigmoid(torch.tensor([3.0, 1.0])))
    # query 2 spans x 0.8..1.1 and y -0.1..0.3 of the image: clipped to (160, 0, 200, 30)
    torch.testing.assert_close(det["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0], [160.0, 0.0, 200.0, 30.0]]))
