"""Convergence ablation (issue 19): named training configurations x datasets at equal wall-clock.

    python benchmarks/convergence/make_sets.py --out /tmp/conv_sets
    python benchmarks/convergence/ablate.py --sets /tmp/conv_sets --datasets small,photo,fewshot \\
        --configs default,readme-recipe,demo-recipe --time-budget-min 20 --held-out photo \\
        --out runs/convergence --table docs/convergence_table.md

Each (dataset, configuration) pair runs ``decodet train --data D --time-budget-min M <flags>
--project OUT/runs/D --name CONFIG``, one after the other, then its metrics are read from the run
folder's ``metrics.jsonl`` (the last full evaluation: AP, AP50, APs; the step count; the training
minutes, evaluation excluded) and written to ``OUT/results/D__CONFIG__Mmin.json``.

* Resumable: a pair whose result file exists (same flags, same budget) is not run again; a run
  killed half-way left no result file, so it is started afresh (its run folder is cleared first).
* Nothing is overwritten half-written: result files, the table and the JSON are written to a
  temp file and renamed.
* The held-out dataset (``--held-out``) is reported last: it is the honest number, not the one
  the defaults were tuned on.
* ``--table-only`` rewrites the table and JSON from the results there are, without training
  (pairs not yet run show as ``–``).

Datasets are names under ``--sets`` or ``NAME=PATH`` (e.g. ``synth=data/synth`` for the bundled
set).  Configurations are the ``CONFIGS`` entries below; each aid adds one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# name -> the flags `decodet train` gets besides --data, --time-budget-min, --project, --name.
# Frozen here as data (not read from decodet), so that "today's recipe" stays today's while the
# defaults change under it.
# pieces of the one-factor configurations below
_BS8 = ["--batch-size", "8"]
_FLIP = ["--zoom", "0", "--shift", "0", "--jitter", "0"]  # a flip only
_NO_AIDS = ["--mosaic", "0", "--set", "one_to_many=0"]
_GRID10 = ["--set", "query_grid=[10,10]"]
CONFIGS: dict[str, list[str]] = {
    # what a new user types: nothing (the defaults of the decodet being run)
    "default": [],
    # what `decodet train --data D --time-budget-min M` did before issue 19's recipe (0.1.x): deco_tiny's
    # generic from-scratch recipe, resolved, spelt out so that it stays what it was
    "v0-default": [
        "--model",
        "deco_tiny",
        "--imgsz",
        "320",
        "--lr",
        "4e-4",
        "--lr-backbone",
        "4e-4",
        "--warmup-steps",
        "200",
        "--schedule",
        "cosine",
        "--clip-grad",
        "0.1",
        "--amp",
        "none",
        "--ema",
        "--ema-decay",
        "0.9999",
        "--zoom",
        "0.4",
        "--shift",
        "0.1",
        "--jitter",
        "0.2",
        "--loss",
        "weight_class=1",
        # issue 19's own choices, off: no tiling, no one-to-many group, the preset's 10x10 query grid
        "--mosaic",
        "0",
        "--set",
        "one_to_many=0",
        "--set",
        "query_grid=[10,10]",
        "--no-fit-schedule",
    ],
    # the README's "Train on your own data" command (its --epochs 50 is cut by the budget)
    "readme-recipe": ["--model", "deco_tiny", "--epochs", "50", "--imgsz", "320"],
    # the demo's recipe (decodet.demo.RECIPE as of issue 19, the README's measured one) at 320 px,
    # its schedule fitted to the budget
    "demo-recipe": [
        "--model",
        "deco_tiny",
        "--imgsz",
        "320",
        "--transforms",
        "light",
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--lr-backbone",
        "1e-3",
        "--warmup-steps",
        "100",
        "--schedule",
        "cosine",
        "--clip-grad",
        "1.0",
        "--amp",
        "auto",
        "--ema",
        "--ema-decay",
        "0.995",
        "--ema-warmup",
        "100",
        "--zoom",
        "0",
        "--shift",
        "0",
        "--jitter",
        "0",
        "--loss",
        "weight_class=3",
        "--epochs",
        "50",
        # issue 19's own choices, off: no tiling, no one-to-many group, the preset's 10x10 query grid
        "--mosaic",
        "0",
        "--set",
        "one_to_many=0",
        "--set",
        "query_grid=[10,10]",
        "--fit-schedule",
    ],
    # issue 19's aids on the default path, each alone and together, the data recipe's own choice of them
    # overridden (on each set, `default` equals one of these four: its log's "data recipe:" lines say which)
    "no-aids": ["--mosaic", "0", "--set", "one_to_many=0"],
    "mosaic": ["--mosaic", "0.5", "--set", "one_to_many=0"],
    "o2m": ["--mosaic", "0", "--set", "one_to_many=4"],
    "mosaic+o2m": ["--mosaic", "0.5", "--set", "one_to_many=4"],
    # the fine-tuning proxy: from a detector trained on another dataset (the bundled set's demo model,
    # `make demo`; 8 classes, so the class heads are re-initialised).  v0-finetune is what `--weights W`
    # gave before issue 19's recipe (the preset's fine-tuning recipe, fp32, EMA 0.9999, zoom 0.4, 12 epochs
    # not fitted to the budget), spelt out; finetune is today's default path with the same weights.
    "v0-finetune": [
        "--weights",
        "runs/demo/best.safetensors",
        "--imgsz",
        "320",
        "--amp",
        "none",
        "--ema-decay",
        "0.9999",
        "--zoom",
        "0.4",
        "--shift",
        "0.1",
        "--jitter",
        "0.2",
        "--set",
        "one_to_many=0",
        "--set",
        "query_grid=[10,10]",
        "--mosaic",
        "0",
        "--epochs",
        "12",
        "--no-fit-schedule",
    ],
    "finetune": ["--weights", "runs/demo/best.safetensors"],
    # the default fine-tuning path at higher rates (the preset's fine-tuning recipe: lr 1.5e-4, backbone 1.5e-5)
    "finetune-lr5e-4": ["--weights", "runs/demo/best.safetensors", "--lr", "5e-4", "--lr-backbone", "5e-5"],
    "finetune-lr1e-3": ["--weights", "runs/demo/best.safetensors", "--lr", "1e-3", "--lr-backbone", "1e-4"],
    "finetune-lr2e-3": ["--weights", "runs/demo/best.safetensors", "--lr", "2e-3", "--lr-backbone", "2e-4"],
    "finetune-lr1e-3-cos": [
        "--weights",
        "runs/demo/best.safetensors",
        "--lr",
        "1e-3",
        "--lr-backbone",
        "1e-4",
        "--schedule",
        "cosine",
    ],
    # the demo recipe's batch and augmentation on the default path, with the data recipe's aids and without
    "bs8-noaug": [*_BS8, *_FLIP],
    "bs8-noaug-no-aids": [*_BS8, *_FLIP, *_NO_AIDS],
    # on e-grid (the demo recipe's settings through the default path), one aid or the size-based augmentation
    "e-grid+o2m": [*_BS8, *_FLIP, "--mosaic", "0", "--set", "one_to_many=4", *_GRID10],
    "e-grid+mosaic": [*_BS8, *_FLIP, "--mosaic", "0.5", "--set", "one_to_many=0", *_GRID10],
    "e-grid+aug": [*_BS8, *_NO_AIDS, *_GRID10],
    # one setting of the demo's recipe at a time on bs8-noaug-no-aids (what separates it from demo-recipe)
    "e-ema": [*_BS8, *_FLIP, *_NO_AIDS, "--ema-decay", "0.995", "--ema-warmup", "100"],
    "e-warmup": [*_BS8, *_FLIP, *_NO_AIDS, "--warmup-steps", "100"],
    "e-grid": [*_BS8, *_FLIP, *_NO_AIDS, *_GRID10],
    # one setting of the demo's recipe at a time on top of the default path (what separates the two)
    "bs8": ["--batch-size", "8"],
    "ema-demo": ["--ema-decay", "0.995", "--ema-warmup", "100"],
    # on top of the default path: denoising query grids (DN-DETR / DINO, DECO+ frame), a higher rate, or one
    # training size (the data recipe's own choice of it overridden)
    "dn": ["--set", "denoising=1"],
    # dense one-to-many supervision of DECO+'s encoder head (decodet.losses.dense), k positions per box
    "dense10": ["--set", "dense_aux=10"],
    "dense4": ["--set", "dense_aux=4"],
    # progressive resizing (decodet.engine.progressive): the first half of the budget at 160 px, then 320
    "prog160-320": ["--imgsz", "320", "--start-imgsz", "160"],
    # one query per stride-16 memory cell at 320 px (20x20 instead of the preset's 10x10)
    "q20": ["--set", "query_grid=[20,20]", "--set", "num_top_queries=400"],
    # other batch sizes on the default path (about the same images per second on 2 cores: the batch sets the steps)
    "bs4": ["--batch-size", "4"],
    "bs16": ["--batch-size", "16"],
    "bs16-lr1.4x": ["--batch-size", "16", "--lr", "1.4e-3", "--lr-backbone", "1.4e-3"],
    "lr2x": ["--lr", "2e-3", "--lr-backbone", "2e-3"],
    "imgsz256": ["--imgsz", "256"],
    "imgsz224": ["--imgsz", "224"],
    "imgsz192": ["--imgsz", "192"],
    "imgsz160": ["--imgsz", "160"],
    "imgsz320": ["--imgsz", "320"],
}
COLUMNS = ("AP", "AP50", "APs", "steps", "train min", "wall min")
RESULT_VERSION = 1

Runner = Callable[[list[str], Path], int]  # (command, log file) -> exit status


# ---------------------------------------------------------------------------- files


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _budget_tag(minutes: float) -> str:
    return f"{minutes:g}min"


def result_path(out: Path, dataset: str, config: str, minutes: float) -> Path:
    return out / "results" / f"{dataset}__{config}__{_budget_tag(minutes)}.json"


def load_result(path: Path, flags: list[str]) -> dict[str, Any] | None:
    """The stored result, or None when absent, unreadable or measured with other flags."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if result.get("flags") != flags or result.get("version") != RESULT_VERSION:
        print(f"stale result (other flags): {path}; running again", file=sys.stderr)
        return None
    return result


def read_run_metrics(run_dir: Path) -> dict[str, Any]:
    """AP, AP50, APs of the last full evaluation in ``run_dir/metrics.jsonl``, steps, training minutes, best AP."""
    records = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a torn last line
    if not records:
        raise ValueError(f"no metric records in {run_dir / 'metrics.jsonl'}")
    full = [r for r in records if "val/AP" in r and "val/subset" not in r]
    final = full[-1] if full else {}
    return {
        "AP": final.get("val/AP"),
        "AP50": final.get("val/AP50"),
        "APs": final.get("val/APs"),
        "best_AP": max((r["val/AP"] for r in full), default=None),
        "steps": records[-1].get("step"),
        "epochs": records[-1].get("epoch"),
        "train_min": sum(float(r.get("epoch_time", 0.0)) for r in records) / 60,
        "final_loss": records[-1].get("train/loss"),
    }


# ---------------------------------------------------------------------------- running


def _subprocess_runner(cmd: list[str], log: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as f:
        return subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)


def train_command(data: str, config: str, minutes: float, project: Path, extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "decodet", "train", "--data", data, "--time-budget-min", f"{minutes:g}",
            *CONFIGS[config], *extra, "--project", str(project), "--name", config, "--exist-ok"]  # fmt: skip


def run_pair(
    dataset: str, data: str, config: str, minutes: float, out: Path, extra: Sequence[str] = (),
    runner: Runner = _subprocess_runner,
) -> dict[str, Any] | None:  # fmt: skip
    """Train one pair (unless its result exists) and store its result; None when the run failed."""
    flags = CONFIGS[config] + list(extra)
    path = result_path(out, dataset, config, minutes)
    done = load_result(path, flags)
    if done is not None:
        print(f"[skip] {dataset} x {config}: result exists ({path})")
        return done
    project = out / "runs" / dataset
    run_dir = project / config
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-done run: start afresh, never mix metrics
    cmd = train_command(data, config, minutes, project, extra)
    log = out / "logs" / f"{dataset}__{config}__{_budget_tag(minutes)}.log"
    print(f"[run] {dataset} x {config}: {' '.join(cmd[1:])}", flush=True)
    start = time.monotonic()
    rc = runner(cmd, log)
    wall = (time.monotonic() - start) / 60
    if rc != 0:
        print(f"[fail] {dataset} x {config}: exit status {rc}, see {log}", file=sys.stderr)
        return None
    result = {
        "version": RESULT_VERSION,
        "dataset": dataset,
        "data": data,
        "config": config,
        "flags": flags,
        "budget_min": minutes,
        "wall_min": wall,
        "run_dir": str(run_dir),
        "log": str(log),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **read_run_metrics(run_dir),
    }
    write_atomic(path, json.dumps(result, indent=1) + "\n")
    print(f"[done] {dataset} x {config}: AP {_fmt(result['AP'])}, {result['steps']} steps, {wall:.1f} min", flush=True)
    return result


# ---------------------------------------------------------------------------- reporting


def order_datasets(datasets: Sequence[str], held_out: str | None) -> list[str]:
    """``datasets`` in order, the held-out one moved last."""
    return [d for d in datasets if d != held_out] + ([held_out] if held_out in datasets else [])


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value) or value < 0)):
        return "–"  # pycocotools reports -1 where a size range has no object
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(
    results: dict[tuple[str, str], dict[str, Any]],
    datasets: Sequence[str],
    configs: Sequence[str],
    held_out: str | None,
    minutes: float,
) -> str:
    """Markdown table: one row per (dataset, configuration), held-out dataset last; ``–`` where not run."""
    lines = [
        f"Equal wall-clock: `--time-budget-min {minutes:g}` per run (training steps; evaluation not counted).",
        "",
        "| dataset | configuration | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for dataset in order_datasets(datasets, held_out):
        label = f"{dataset} (held out)" if dataset == held_out else dataset
        for config in configs:
            r = results.get((dataset, config), {})
            cells = [_fmt(r.get("AP")), _fmt(r.get("AP50")), _fmt(r.get("APs")), _fmt(r.get("steps")),
                     _fmt(r.get("train_min"), 1), _fmt(r.get("wall_min"), 1)]  # fmt: skip
            lines.append(f"| {label} | {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def collect(out: Path, datasets: Sequence[str], configs: Sequence[str], minutes: float, extra: Sequence[str] = ()):
    """The stored results of every pair that has one."""
    found = {}
    for d in datasets:
        for c in configs:
            r = load_result(result_path(out, d, c, minutes), CONFIGS[c] + list(extra))
            if r is not None:
                found[(d, c)] = r
    return found


def write_report(
    out: Path, table: Path, json_path: Path, datasets, configs, held_out, minutes, extra: Sequence[str] = ()
) -> dict[tuple[str, str], dict[str, Any]]:
    results = collect(out, datasets, configs, minutes, extra)
    write_atomic(table, format_table(results, datasets, configs, held_out, minutes))
    raw = {
        "budget_min": minutes,
        "held_out": held_out,
        "datasets": order_datasets(datasets, held_out),
        "configs": {c: CONFIGS[c] for c in configs},
        "results": [results[(d, c)] for d in order_datasets(datasets, held_out) for c in configs if (d, c) in results],
    }
    write_atomic(json_path, json.dumps(raw, indent=1) + "\n")
    return results


def parse_datasets(spec: str, sets: Path | None) -> dict[str, str]:
    """``small,photo`` (folders under ``sets``) or ``synth=data/synth`` entries -> {name: path}."""
    out = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, path = item.partition("=")
        if not path:
            if sets is None:
                raise SystemExit(f"dataset {name!r} needs --sets DIR or the form {name}=PATH")
            path = str(sets / name)
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", type=Path, help="folder of make_sets.py's datasets")
    p.add_argument("--datasets", default="small,photo,fewshot", help="names under --sets or NAME=PATH")
    p.add_argument("--configs", default="default,readme-recipe", help=f"comma-separated, of: {', '.join(CONFIGS)}")
    p.add_argument("--time-budget-min", type=float, required=True, help="every run's training budget (minutes)")
    p.add_argument("--held-out", help="dataset reported last (not used while tuning defaults)")
    p.add_argument("--out", type=Path, default=Path("runs/convergence"), help="runs, logs and result files")
    p.add_argument("--table", type=Path, required=True, help="markdown table to write")
    p.add_argument("--json", type=Path, help="raw results (default: the table's path with .json)")
    p.add_argument("--extra", default="", help="flags added to every run, e.g. '--threads 2 --seed 1'")
    p.add_argument("--table-only", action="store_true", help="no training: write the table from stored results")
    p.add_argument("--dry-run", action="store_true", help="print the commands of the pairs still to run")
    args = p.parse_args(argv)

    datasets = parse_datasets(args.datasets, args.sets)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown} (known: {', '.join(CONFIGS)})")
    if args.held_out and args.held_out not in datasets:
        raise SystemExit(f"--held-out {args.held_out!r} is not among --datasets")
    extra = args.extra.split()
    json_path = args.json or args.table.with_suffix(".json")
    failed = 0
    if not args.table_only:
        for dataset in order_datasets(list(datasets), args.held_out):
            for config in configs:
                if args.dry_run:
                    path = result_path(args.out, dataset, config, args.time_budget_min)
                    if load_result(path, CONFIGS[config] + extra) is None:
                        project = args.out / "runs" / dataset
                        print(" ".join(train_command(datasets[dataset], config, args.time_budget_min, project, extra)))
                    continue
                r = run_pair(dataset, datasets[dataset], config, args.time_budget_min, args.out, extra)
                failed += r is None
                # the table after every pair: a long ablation shows its progress
                write_report(args.out, args.table, json_path, list(datasets), configs, args.held_out,
                             args.time_budget_min, extra)  # fmt: skip
    if args.dry_run:
        return 0
    write_report(args.out, args.table, json_path, list(datasets), configs, args.held_out, args.time_budget_min, extra)
    print(args.table.read_text(encoding="utf-8"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
