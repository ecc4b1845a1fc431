"""Shared test helpers: reference tables, small configs."""

from __future__ import annotations

import os
from collections import Counter
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


def shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder all test processes of this run see (pytest-xdist workers share the parent of
    their temp folders); build what goes in it under :func:`shared_lock`."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / "shared" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared_lock(folder: Path):
    """One builder at a time for a :func:`shared_dir` folder; the others wait, then reuse it."""
    from filelock import FileLock  # a dependency of torch

    return FileLock(str(folder) + ".lock")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with the most ``slow`` tests first, the rest in their order.  Under pytest-xdist
    (``make test``: ``--dist loadfile --no-loadscope-reorder``) a file is a unit of work, and a
    long file handed out last keeps one worker busy while the others idle."""

    def file_of(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    slow = Counter(file_of(item) for item in items if item.get_closest_marker("slow"))
    files = list(dict.fromkeys(file_of(item) for item in items))
    order = {path: rank for rank, path in enumerate(sorted(files, key=lambda p: -slow[p]))}  # stable: ties keep order
    items.sort(key=lambda item: order[file_of(item)])
