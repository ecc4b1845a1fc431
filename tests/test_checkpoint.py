"""Checkpoints: our safetensors format, the authors' .pth files, and bad files."""

from __future__ import annotations

import argparse
import collections
import logging

import pytest
import torch

import decodet
from decodet.errors import DecodetError
from decodet.io.checkpoint import load_weights_into, ours_to_official, read_checkpoint, save_model
from test_deco import small_deco


def _same_outputs(a, b, size=(96, 128)):
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        oa, ob = a.eval()(x), b.eval()(x)
    return max((oa[k] - ob[k]).abs().max().item() for k in ("pred_logits", "pred_boxes"))


def _authors_file(tmp_path, model, name="deco.pth"):
    path = tmp_path / name
    args = argparse.Namespace(lr=1e-4, backbone="resnet18", num_queries=100, qH=10, dec_layers=6)
    torch.save({"model": ours_to_official(model.state_dict()), "args": args, "epoch": 149}, path)
    return path


def test_ours_round_trip_keeps_config_and_outputs(tmp_path):
    model = small_deco(category_ids=[3, 5, 7, 9, 11], class_names=list("abcde"))
    path = save_model(model, tmp_path / "m.safetensors")
    loaded = decodet.load_model(path)
    assert loaded.config == model.config
    assert not loaded.training
    assert _same_outputs(model, loaded) == 0.0
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


@pytest.fixture(scope="module")
def deco_r18():
    torch.manual_seed(0)
    model = decodet.build_model("deco_r18", num_classes=91)
    # random BN statistics so that the frozen batch norms matter
    for name, buf in model.named_buffers():
        if name.endswith("running_var"):
            buf.uniform_(0.5, 2.0)
        elif name.endswith("running_mean"):
            buf.normal_(0, 0.1)
    return model.eval()


def test_authors_checkpoint_loads_with_identical_outputs(tmp_path, deco_r18):
    path = _authors_file(tmp_path, deco_r18)
    loaded = decodet.load_model(path)
    assert loaded.config.name == "deco_r18" and loaded.config.num_classes == 91
    assert loaded.config.category_ids is None and loaded.config.class_names[1] == "person"
    assert _same_outputs(deco_r18, loaded) <= 1e-4


def test_convert_official_writes_our_format(tmp_path, deco_r18):
    out = decodet.convert_official(_authors_file(tmp_path, deco_r18), tmp_path / "ours.safetensors")
    cfg, state = read_checkpoint(out)
    assert cfg.name == "deco_r18" and "query_content.weight" in state
    assert _same_outputs(deco_r18, decodet.load_model(out)) <= 1e-4


def test_unsafe_pickle_is_refused_not_executed(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "extra": collections.OrderedDict(a=1), "obj": _Evil()}, path)
    with pytest.raises(DecodetError, match="not allowed by safe loading"):
        decodet.load_model(path)


class _Evil:
    pass


@pytest.mark.parametrize("cut", [0, 100, 5000])
def test_truncated_or_empty_files_are_clear_errors(tmp_path, cut):
    good = save_model(small_deco(), tmp_path / "m.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:cut])
    with pytest.raises(DecodetError, match=str(bad)):
        decodet.load_model(bad)


def test_truncated_authors_file(tmp_path, deco_r18):
    path = _authors_file(tmp_path, deco_r18)
    bad = tmp_path / "cut.pth"
    bad.write_bytes(path.read_bytes()[: 1 << 20])
    with pytest.raises(DecodetError, match="cut.pth: corrupt or truncated"):
        decodet.load_model(bad)


def test_missing_file(tmp_path):
    with pytest.raises(DecodetError, match="not found"):
        decodet.load_model(tmp_path / "nope.safetensors")


def test_checkpoint_of_another_architecture(tmp_path):
    import torchvision

    path = tmp_path / "resnet.pth"
    torch.save({"model": torchvision.models.resnet18().state_dict()}, path)
    with pytest.raises(DecodetError, match="no DECO/DECO\\+ class head"):
        decodet.load_model(path)
    # right head, wrong body: one mismatching tensor
    state = ours_to_official(decodet.build_model("deco_r18", num_classes=91).state_dict())
    state["input_proj.weight"] = torch.zeros(120, 256, 1, 1)
    torch.save({"model": state}, path)
    with pytest.raises(DecodetError, match="match no known model"):
        decodet.load_model(path)


def test_fine_tuning_reinitialises_class_heads_with_warning(tmp_path, caplog):
    src = small_deco()
    path = save_model(src, tmp_path / "src.safetensors")
    dst = decodet.build_model(
        "deco_r18",
        num_classes=3,
        d_model=32,
        encoder_dims=(8, 16, 32),
        encoder_depths=(1, 1, 1),
        num_decoder_layers=2,
        query_grid=(3, 4),
    )
    fresh_head = dst.class_heads[0].weight.clone()
    with caplog.at_level(logging.WARNING):
        report = load_weights_into(dst, path)
    assert "class heads re-initialised" in caplog.text
    assert set(report["reinitialised"]) == {f"class_heads.{i}.{p}" for i in range(2) for p in ("weight", "bias")}
    assert torch.equal(dst.class_heads[0].weight, fresh_head)
    assert torch.equal(dst.query_pos.weight, src.query_pos.weight)


def test_weights_of_another_architecture_for_fine_tuning(tmp_path):
    path = save_model(small_deco(), tmp_path / "src.safetensors")
    other = small_deco(d_model=64, encoder_dims=(8, 16, 64))
    with pytest.raises(DecodetError, match="do not fit"):
        load_weights_into(other, path)


def test_authors_decoplus_checkpoint_prefers_ema_weights(tmp_path):
    torch.manual_seed(0)
    model = decodet.build_model("decoplus_r18", num_classes=80).eval()
    state = model.state_dict()
    path = tmp_path / "decoplus_r18.pth"
    torch.save(
        {"model": {k: torch.zeros_like(v) for k, v in state.items()}, "ema": {"module": state, "updates": 7}}, path
    )
    loaded = decodet.load_model(path)
    assert loaded.config.name == "decoplus_r18"
    # the authors' 80 logits are the COCO categories in ascending id order
    assert loaded.config.category_ids[:3] == [1, 2, 3] and loaded.config.category_ids[-1] == 90
    assert loaded.config.class_names[0] == "person"
    assert _same_outputs(model, loaded, size=(256, 256)) <= 1e-4
