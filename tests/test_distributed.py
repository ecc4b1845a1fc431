"""Multi-process training on CPU (gloo): data order, gradient parity with one process, rank-0-only
writes, and evaluation that gathers every process's images exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from decodet.data.transforms import build_transforms
from decodet.engine import trainer as trainer_mod
from decodet.evaluation.evaluate import evaluate_checkpoint
from decodet.utils.distributed import EpochSampler, ShardSampler
from test_trainer import TINY, make_tiny_coco, tiny_config

TESTS = Path(__file__).resolve().parent

# Two processes x batch 2 and one process x batch 4 sum the same per-image gradients in a
# different order (two partial sums + an all-reduce instead of one sum), so the weights agree to
# float32 rounding (measured: 4e-8 after 4 steps), amplified a little by Adam's division by
# sqrt(v); any real mistake (a different batch, a loss normalised by the local box count,
# gradients summed instead of averaged) moves them by the size of an update, ~lr = 1e-3.
PARITY_ATOL = 1e-6


# ----------------------------------------------------------------------------- samplers


def _rank_batches(n: int, world: int, batch: int, epoch: int, start_batch: int = 0) -> list[list[list[int]]]:
    """``[rank][batch] -> indices`` that each rank's EpochSampler yields in ``epoch``."""
    out = []
    for rank in range(world):
        sampler = EpochSampler(list(range(n)), seed=3, rank=rank, world_size=world)
        sampler.set_epoch(epoch)
        sampler.start = start_batch * batch
        order = list(sampler)
        assert len(order) == len(sampler)
        out.append([order[i : i + batch] for i in range(0, len(order), batch)])
    return out


@pytest.mark.parametrize("n, world, batch", [(8, 2, 2), (14, 2, 3), (12, 3, 1), (12, 4, 2), (24, 4, 2)])
def test_global_batches_equal_one_process_with_world_times_the_batch(n: int, world: int, batch: int) -> None:
    """Step s of N processes x batch b trains on exactly the images of step s of 1 process x batch N*b
    (when N divides the image count; otherwise the sampler repeats a few images to even the shards)."""
    for epoch in (0, 5):
        (single,) = _rank_batches(n, 1, world * batch, epoch)
        ranks = _rank_batches(n, world, batch, epoch)
        assert all(len(r) == len(single) for r in ranks)
        for step, images in enumerate(single):
            together = [i for r in ranks for i in r[step]]
            assert sorted(together) == sorted(images), (epoch, step)
        # resuming part-way through the epoch continues with the same global batches
        resumed = _rank_batches(n, world, batch, epoch, start_batch=1)
        for step, images in enumerate(single[1:]):
            assert sorted(i for r in resumed for i in r[step]) == sorted(images)
    # the order is a function of (seed, epoch) only
    assert _rank_batches(n, 2, 2, 1) == _rank_batches(n, 2, 2, 1) != _rank_batches(n, 2, 2, 2)


@pytest.mark.parametrize("n, world", [(7, 2), (10, 3), (2, 4), (5, 1)])
def test_shard_sampler_covers_every_image_exactly_once(n: int, world: int) -> None:
    shards = [list(ShardSampler(n, rank, world)) for rank in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


# ----------------------------------------------------------------------------- parity under torchrun


def _freeze_batch_norms(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d at its current statistics (in place).

    deco_tiny's batch norms normalise with the statistics of each process's local batch, which
    differ from the global batch's by design (SyncBatchNorm has no CPU implementation); with them
    frozen the model's output for an image no longer depends on the other images of the batch,
    which is what gradient parity needs.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            setattr(module, name, frozen)
        else:
            _freeze_batch_norms(child)
    return module


@contextlib.contextmanager
def _without_batch_statistics() -> Iterator[None]:
    real = trainer_mod.build_from_config
    trainer_mod.build_from_config = lambda cfg: _freeze_batch_norms(real(cfg))
    try:
        yield
    finally:
        trainer_mod.build_from_config = real


def train_for_parity(cfg_dict: dict) -> dict:
    """Train with frozen batch norms and deterministic (evaluation) transforms: a run whose
    gradients depend only on which images form each global batch."""
    from decodet.engine.train_config import TrainConfig

    cfg = TrainConfig.from_dict(cfg_dict)
    with _without_batch_statistics():
        trainer = trainer_mod.Trainer(cfg)
    trainer.train_set.transforms = build_transforms("light", train=False, imgsz=cfg.imgsz)
    try:
        return trainer.fit()  # under torchrun the process group stays up for the caller
    finally:
        trainer.close()


_SCRIPT = """
import json, os, sys
import torch
torch.set_num_threads(1)
root = os.path.realpath(sys.argv[3])
results = os.path.realpath(sys.argv[4])
writes = []  # every file this process opens for writing (or renames, removes, creates) under root

def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path, mode, flags = args
        writing = (mode and any(c in mode for c in "wax+")) or (flags and flags & (os.O_WRONLY | os.O_RDWR))
        where = os.path.realpath(os.fsdecode(path))
        if writing and where.startswith(root) and not where.startswith(results):
            writes.append(os.fsdecode(path))
    elif event in ("os.rename", "os.mkdir", "os.remove") and str(args[0]).startswith(root):
        writes.append(f"{event} {args[0]}")

sys.addaudithook(hook)
sys.path.insert(0, sys.argv[1])
from test_distributed import train_for_parity
from decodet.utils import distributed
final = train_for_parity(json.loads(sys.argv[2]))
final.pop("images_per_s")
distributed.cleanup()
with open(os.path.join(results, os.environ["RANK"] + ".json"), "w") as f:
    json.dump({"final": final, "writes": writes}, f)
"""


def _torchrun(cwd: Path, *args: str) -> None:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` on the CPU; fails the test on a non-zero exit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        _, err = proc.communicate()
        pytest.fail(f"torchrun timed out: {err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_two_processes_equal_one_process_and_gather_every_image(tmp_path: Path) -> None:
    data = make_tiny_coco(tmp_path / "data", n_train=8, n_val=3)  # 3 val images: not divisible by 2
    # The "score" query layout: the "spatial" one places queries by box centres, and centres
    # that tie within float rounding may swap cells between the two runs — a legitimate
    # difference that would hide the one this test looks for.
    overrides = {**TINY, "query_layout": "score"}
    common = {"epochs": 2, "ema": True, "ema_warmup": 2, "eval_every": 1, "device": "cpu", "seed": 7}
    common["model_overrides"] = overrides
    two = tiny_config(tmp_path, data, name="two", batch_size=2, **common).to_dict()
    one = tiny_config(tmp_path, data, name="one", batch_size=4, **common).to_dict()

    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    results_dir = tmp_path / "results"  # where each rank reports (exempt from the write check)
    results_dir.mkdir()
    _torchrun(tmp_path, str(script), str(TESTS), json.dumps(two), str(tmp_path), str(results_dir))
    results = {rank: json.loads((results_dir / f"{rank}.json").read_text()) for rank in (0, 1)}

    # every rank ends with the same (all-reduced / broadcast) numbers, evaluation stats included
    # (rank 1 gets them only from rank 0); only rank 0 wrote files
    assert results[0]["final"] == results[1]["final"]
    assert results[1]["writes"] == []
    assert any(".last_state.pt." in w for w in results[0]["writes"])  # the check sees rank 0's writes
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["two"]

    # the same data order on one process with twice the batch reaches the same weights
    single = train_for_parity(one)
    assert single["step"] == results[0]["final"]["step"] == 4
    a = torch.load(tmp_path / "runs" / "two" / "last_state.pt", weights_only=True)
    b = torch.load(tmp_path / "runs" / "one" / "last_state.pt", weights_only=True)
    for part in ("model", "ema"):
        sa, sb = (a[part], b[part]) if part == "model" else (a[part]["module"], b[part]["module"])
        assert sa.keys() == sb.keys()
        diffs = {k: (sa[k].double() - sb[k].double()).abs().max().item() for k in sa if sa[k].is_floating_point()}
        worst = max(diffs.values())
        assert worst <= PARITY_ATOL, (part, worst, max(diffs, key=diffs.get))
    assert results[0]["final"]["train/loss"] == pytest.approx(single["train/loss"], rel=1e-5)

    # `decodet eval` under torchrun: 3 images over 2 processes, each scored once, as one process scores them
    weights = tmp_path / "runs" / "two" / "last.safetensors"
    eval_argv = ["eval", "--weights", str(weights), "--data", str(data), "--imgsz", "64", "--batch-size", "2"]
    _torchrun(tmp_path, "-m", "decodet", *eval_argv, "--device", "cpu", "--out", str(tmp_path / "eval_two"))
    ref_dir = tmp_path / "eval_one"
    ref = evaluate_checkpoint(weights, data, imgsz=64, batch_size=2, out=ref_dir)
    dets_two = json.loads((tmp_path / "eval_two" / "detections.json").read_text())
    dets_one = json.loads((ref_dir / "detections.json").read_text())
    per_image = Counter(d["image_id"] for d in dets_two)
    assert per_image == Counter(d["image_id"] for d in dets_one)
    assert sorted(per_image) == [10, 11, 12] and len(set(per_image.values())) == 1
    for image_id in per_image:
        scores_two = sorted(d["score"] for d in dets_two if d["image_id"] == image_id)
        scores_one = sorted(d["score"] for d in dets_one if d["image_id"] == image_id)
        assert scores_two == pytest.approx(scores_one, abs=1e-5)
    assert json.loads((tmp_path / "eval_two" / "stats.json").read_text()) == pytest.approx(ref, abs=1e-6)
    assert results[0]["final"]["AP"] == pytest.approx(ref["AP"], abs=1e-6)  # the in-training evaluation agrees
