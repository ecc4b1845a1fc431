"""``decodet demo``: the whole job on the bundled data, on a CPU, in about ten minutes.

1. generate the bundled synthetic dataset if it is missing (deterministic, seed 0);
2. train ``deco_tiny`` from random weights with the CPU recipe below for a wall-clock budget;
3. evaluate COCO mAP on the validation split (the trainer does, with the EMA weights);
4. draw predictions on validation images; print where everything is.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from decodet.data.spec import resolve_data
from decodet.data.synthetic import generate_synthetic
from decodet.engine.train_config import TrainConfig
from decodet.errors import DecodetError

log = logging.getLogger(__name__)

# The bundled dataset: the project's standing accuracy benchmark.
DATA = {"train": 3000, "val": 300, "image_size": 256, "seed": 0}

# The demo's recipe: from scratch, everything trains; bf16 autocast where this CPU runs it
# faster than fp32 (timed at start: see fastest_amp), a high learning rate with warm-up and a
# cosine decay sized to the budget, EMA weights for evaluation.
RECIPE = {
    "model": "deco_tiny",
    "imgsz": 256,
    "transforms": "light",
    "batch_size": 8,
    "lr": 1e-3,
    "lr_backbone": 1e-3,
    "warmup_steps": 100,
    "schedule": "cosine",
    "clip_grad": 1.0,
    "amp": "bf16",
    "ema": True,
    "ema_decay": 0.995,
    "ema_warmup": 100,
    # Evaluate after every epoch on 100 validation images (a cheap curve for map.png); the
    # final evaluation uses all 300.
    "eval_every": 1,
    "eval_subset": 100,
    "workers": 1,
    # No random zoom, shift or colour jitter (a flip remains): the bundled splits share one
    # distribution, and at this budget augmentation only slows fitting.  4 epochs: zoom 0.4 ->
    # AP 0.384, 0.2 -> 0.419, 0 -> 0.504.  With zoom 0, 1,579 steps: shift 0.1 and jitter 0.2
    # -> AP 0.513; none -> see the README's table.
    "zoom": 0.0,
    "shift": 0.0,
    "jitter": 0.0,
    # A heavier class term than DECO+'s 1: on the demo run, weight 3 gave AP 0.359, weight 2
    # 0.316, weight 5 0.360 (and after 1,125 steps: 2 -> 0.244, 1 -> 0.201).
    "loss_overrides": {"weight_class": 3.0},
}
EPOCHS = 5
# The training-time budget (evaluation not counted).  The first steps are timed and the cosine
# schedule is sized to end inside it (fit_schedule): 5 epochs (1,875 steps) where the machine
# allows, fewer steps but a complete schedule on a slower one.  12.5 minutes of training plus
# about 75 s of set-up, evaluation and drawing keep ``make demo`` under 15 minutes.
MINUTES = 12.5


def demo_config(
    data_dir: Path, out_dir: Path, minutes: float, threads: int | None, amp: str | None = None
) -> TrainConfig:
    """The demo's :class:`TrainConfig` (also what the README's numbers were measured with)."""
    threads = threads or max(1, min(os.cpu_count() or 1, 8))
    recipe = {**RECIPE, "amp": amp or RECIPE["amp"], "workers": demo_workers()}
    return TrainConfig(
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
    from decodet.deploy.predict import predict_to_folder
    from decodet.engine.trainer import train

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if not (data_dir / "data.yaml").exists():
        if data_dir.exists() and any(data_dir.iterdir()):
            raise DecodetError("exists but holds no data.yaml; remove it or pass another --data", data_dir)
        log.info("generating the bundled dataset in %s", data_dir)
        generate_synthetic(data_dir, **DATA)
    threads = threads or max(1, min(os.cpu_count() or 1, 8))
    cfg = demo_config(data_dir, out_dir, minutes, threads, amp=fastest_amp(threads))
    metrics = train(cfg)
    run_dir = Path(metrics.get("run_dir", out_dir))
    val = resolve_data(data_dir).split("val")
    images = sorted(val.images_dir.iterdir())[:24]
    predict_to_folder(
        images, run_dir / "best.safetensors", out_dir=run_dir / "predictions", threshold=0.4, device="cpu"
    )
    _report(run_dir, metrics)
    return metrics


def fastest_amp(threads: int, steps: int = 3) -> str:
    """``"bf16"`` or ``"none"``: whichever trains the demo's model faster on this CPU.

    bf16 autocast is about twice as fast as fp32 on CPUs with AMX or a fast AVX-512-BF16 unit and
    slower than fp32 on others (0.53 vs 0.42 s per step measured on one AVX-512-BF16 Xeon), so
    the demo times a few training steps of each (a few seconds) instead of guessing from flags.
    """
    import time

    from decodet.losses import build_criterion
    from decodet.registry import build_model

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = build_model(RECIPE["model"], num_classes=8).train()
        criterion = build_criterion(model.config)
        size, batch = RECIPE["imgsz"], RECIPE["batch_size"]
        images = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        box = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.3]])
        targets = [{"labels": torch.tensor([1, 2]), "boxes": box} for _ in range(batch)]
        seconds = {}
        for amp in ("bf16", "none"):
            times = []
            for _ in range(steps + 1):  # the first step warms up kernels
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
                    outputs = model(images)
                criterion(outputs, targets)["loss"].backward()
                model.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t0)
            seconds[amp] = min(times[1:])
    finally:
        torch.set_num_threads(previous)
    best = min(seconds, key=seconds.get)
    log.info("training step on this CPU: bf16 %.3f s, fp32 %.3f s: training in %s", seconds["bf16"],
             seconds["none"], "bf16" if best == "bf16" else "fp32")  # fmt: skip
    return best


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
