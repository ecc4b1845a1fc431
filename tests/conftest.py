"""Shared test helpers: reference tables, small configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Tiny test models run fastest on one thread (and several test processes share the cores).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
_REF_CANDIDATES = [REPO.parent / "shared" / "reference" / "official_state_dicts", REPO / "tests" / "reference"]


def reference_dir() -> Path | None:
    for cand in _REF_CANDIDATES:
        if cand.is_dir():
            return cand
    return None


def read_reference(name: str) -> dict[str, tuple[int, ...]]:
    """``key -> shape`` from an authors' state-dict table (``scalar`` -> ``()``)."""
    ref = reference_dir()
    if ref is None or not (ref / f"{name}.tsv").exists():
        pytest.skip(f"reference table {name}.tsv not available")
    out = {}
    for line in (ref / f"{name}.tsv").read_text().splitlines()[1:]:
        key, shape = line.split("\t")
        out[key] = () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
    return out


@pytest.fixture
def cache_in_tmp(tmp_path, monkeypatch):
    """Converted annotations go to a cache folder: keep it inside the test's temp folder."""
    monkeypatch.setenv("DECODET_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A tiny synthetic dataset (4 train, 2 val images at 64 px) for the format tests."""
    from decodet.data import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("d") / "synth", train=4, val=2, image_size=64, seed=3)
