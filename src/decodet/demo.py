"""``decodet demo``: the whole job on the bundled data, on a CPU, in about ten minutes.

1. generate the bundled synthetic dataset if it is missing (deterministic, seed 0);
2. train ``deco_tiny`` from random weights with the CPU recipe below for a wall-clock budget;
3. evaluate COCO mAP on the validation split (the trainer does, with the EMA weights);
4. draw predictions on validation images; print where everything is.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch

from decodet.data.spec import resolve_data
from decodet.data.synthetic import generate_synthetic
from decodet.engine.data_recipe import short_run
from decodet.engine.train_config import TrainConfig
from decodet.errors import DecodetError

log = logging.getLogger(__name__)

# The bundled dataset: the project's standing accuracy benchmark.
DATA = {"train": 3000, "val": 300, "image_size": 256, "seed": 0}

# The demo's recipe: from scratch, everything trains; bf16 autocast where this CPU runs it
# faster than fp32 (amp "auto": timed at start, see decodet.engine.amp_probe), a high learning
# rate with warm-up and a cosine decay planned to the budget, EMA weights for evaluation.
RECIPE = {
    "model": "deco_tiny",
    # Progressive resizing (decodet.engine.progressive): the first 35% of the budget at 160 px (1.8x the
    # steps of 256), the rest at the bundled images' own 256, where the model is evaluated and saved.
    # Same machine and budget (a 2-core Zen 4, bf16; docs/convergence.md): AP 0.664 (2,913 steps, 1,403
    # of them at 160) against 0.641 at 160 throughout, 0.643 at 256 and 0.648 with half the budget at
    # 160; 177 background false positives per class at score >= 0.3, against 165 at 160 and 230 at 256.
    "imgsz": 256,
    "start_imgsz": 160,
    "start_fraction": 0.35,
    "transforms": "light",
    "batch_size": 8,
    "lr": 1e-3,
    "lr_backbone": 1e-3,
    "warmup_steps": 100,
    "schedule": "cosine",
    "clip_grad": 1.0,
    "amp": "auto",
    "ema": True,
    "ema_decay": 0.995,
    "ema_warmup": 100,
    # Evaluate after every epoch on 100 validation images (a cheap curve for map.png); the
    # final evaluation uses all 300.
    "eval_every": 1,
    "eval_subset": 100,
    "workers": 1,
    # No random zoom, shift or colour jitter (a flip remains): the bundled splits share one
    # distribution, and at this budget augmentation only slows fitting (measured: docs/benchmarks.md).
    "zoom": 0.0,
    "shift": 0.0,
    "jitter": 0.0,
    # A heavier class term than DECO+'s 1: best AP on the demo run (docs/benchmarks.md).
    "loss_overrides": {"weight_class": 3.0},
}
# An upper bound: the budget decides the run's length (40 epochs, 15,000 steps, would need under
# 0.05 s per step; a 2-core Zen 4 fits about 2,900 steps of 0.18 s at 160 px, then 0.3 s at 256).
EPOCHS = 40
# The training-time budget (evaluation not counted).  The steps are timed and the cosine
# schedule is re-planned as they run to end inside it (fit_schedule): as many steps as the
# machine fits, a complete schedule on any machine.  12.5 minutes of training plus about 75 s
# of set-up, evaluation and drawing keep ``make demo`` under 15 minutes.
MINUTES = 12.5
LONG_IMGSZ = 256  # a demo of 30 minutes or more: one size throughout (progressive resizing not measured there)


def demo_config(
    data_dir: Path, out_dir: Path, minutes: float, threads: int | None, amp: str | None = None
) -> TrainConfig:
    """The demo's :class:`TrainConfig` (also what the README's numbers were measured with); ``amp``
    replaces the recipe's ``"auto"``."""
    threads = threads or max(1, min(os.cpu_count() or 1, 8))
    recipe = {**RECIPE, "amp": amp or RECIPE["amp"], "workers": demo_workers()}
    cfg = TrainConfig(
        **recipe,
        data=str(data_dir),
        epochs=EPOCHS,
        time_budget_min=minutes,
        fit_schedule=True,
        project=str(out_dir.parent),
        name=out_dir.name,
        exist_ok=True,
        threads=threads,
        device="cpu",
    )
    return cfg if short_run(cfg) else dataclasses.replace(cfg, imgsz=LONG_IMGSZ, start_imgsz=None)


def demo_workers(cpus: int | None = None) -> int:
    """Loader processes for the demo: none on a machine with two cores or fewer.

    There a worker process takes its CPU time from one of the two training threads, which then
    wait for each other: 0.464 s per step with one worker against 0.444 s loading in the main
    process (70 steps each, 2-core Xeon).  With more cores the worker runs beside them."""
    cpus = cpus or os.cpu_count() or 1
    return 0 if cpus <= 2 else int(RECIPE["workers"])


def run_demo(
    data_dir: str | os.PathLike = "data/synth",
    out_dir: str | os.PathLike = "runs/demo",
    minutes: float = MINUTES,
    threads: int | None = None,
) -> dict:
    """Run the demo; returns the final metrics."""
    from decodet.engine.trainer import train
    from decodet.predict.images import predict_to_folder

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if not (data_dir / "data.yaml").exists():
        if data_dir.exists() and any(data_dir.iterdir()):
            raise DecodetError("exists but holds no data.yaml; remove it or pass another --data", data_dir)
        log.info("generating the bundled dataset in %s", data_dir)
        generate_synthetic(data_dir, **DATA)
    cfg = demo_config(data_dir, out_dir, minutes, threads)  # amp "auto": the trainer times bf16 and fp32
    metrics = train(cfg)
    run_dir = Path(metrics.get("run_dir", out_dir))
    val = resolve_data(data_dir).split("val")
    images = sorted(val.images_dir.iterdir())[:24]
    predict_to_folder(
        images, run_dir / "best.safetensors", out_dir=run_dir / "predictions", score_threshold=0.4, device="cpu"
    )
    _report(run_dir, metrics)
    return metrics


def _report(run_dir: Path, metrics: dict) -> None:
    ap = metrics.get("AP", float("nan"))
    lines = [
        "",
        f"decodet demo: deco_tiny trained on the bundled data; validation mAP@[.5:.95] = {ap:.3f}, "
        f"AP50 = {metrics.get('AP50', float('nan')):.3f}",
        f"  weights          {run_dir / 'best.safetensors'}",
        f"  metrics          {run_dir / 'metrics.jsonl'} (and metrics.csv)",
        f"  curves           {run_dir / 'loss.png'}, {run_dir / 'map.png'}",
        f"  predictions      {run_dir / 'predictions'}/ (drawn validation images, predictions.json)",
        f"  training config  {run_dir / 'train_config.yaml'}",
        f"  torch threads    {torch.get_num_threads()}",
    ]
    print("\n".join(lines))
