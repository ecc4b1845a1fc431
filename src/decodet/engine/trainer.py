"""The training loop: data -> model -> criterion -> AdamW, with AMP, EMA, clipping, accumulation, DDP,
evaluation, atomic checkpoints and exact resume.

A run folder (``runs/<name>``) receives::

    train_config.yaml   the resolved TrainConfig (what --resume reads back)
    last.safetensors    weights after the latest epoch (the EMA weights when EMA is on)
    best.safetensors    weights of the best evaluation (COCO AP)
    last_state.pt       optimizer, scheduler, scaler, EMA, RNG states, epoch/step: for --resume
    metrics.jsonl/.csv  one record per epoch (decodet.engine.metrics_log); loss.png, map.png: curves

Determinism (:mod:`~decodet.engine.seeding`): a run resumed at an epoch boundary continues exactly as an
uninterrupted one (on CPU); one stopped mid-epoch (time budget, ``max_steps``) saves its RNG states and the
batches done, and its resume skips those and restores the states.

Only rank 0 writes files; every rank evaluates its shard of the validation set and the detections are gathered
before scoring. Robustness: an unreadable image (missing, truncated, not an image) is skipped with a warning
naming it (:mod:`~decodet.engine.run_setup`); every file write is atomic
(:mod:`~decodet.engine.checkpointing`), so a run killed at any moment leaves complete checkpoints (plus, at
worst, a temp file the next run in the folder removes) and ``--resume`` continues."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from decodet.config import input_normalized
from decodet.engine import faults
from decodet.engine.amp_probe import resolve_amp
from decodet.engine.budget import TrainingBudget
from decodet.engine.checkpointing import (
    BEST_METRIC,
    BEST_WEIGHTS,
    LAST_WEIGHTS,
    load_state,
    restore_checkpoint,
    save_checkpoint,
)
from decodet.engine.data_recipe import DataStats, apply_data_recipe
from decodet.engine.early_stopping import EarlyStopping
from decodet.engine.metrics_log import MetricsLogger, log_run_start, plot_curves
from decodet.engine.optim import build_optimizer
from decodet.engine.progressive import ProgressiveSize, resize_batch
from decodet.engine.run_plan import build_schedule
from decodet.engine.run_setup import (
    add_transforms,
    build_train_loader,
    channels_last_for,
    open_train_set,
    probe_unused,
    run_model_config,
)
from decodet.engine.seeding import epoch_seed, get_rng_state, seed_everything, set_determinism, set_rng_state
from decodet.engine.tensorboard import TensorBoardLogger, require_tensorboard
from decodet.engine.train_config import TrainConfig, resolve
from decodet.errors import DecodetError
from decodet.evaluation.evaluate import autocast, check_labels_fit, eval_batch_size, evaluate
from decodet.io.atomic import remove_stale_temp_files
from decodet.losses import build_criterion
from decodet.registry import build_from_config
from decodet.utils import distributed as D
from decodet.utils.console import progress

log = logging.getLogger(__name__)

CONFIG_FILE = "train_config.yaml"
# the options engine.data_recipe chooses when unset (restored from the checkpoint on --resume)
RECIPE_CHOICES = ("imgsz", "zoom", "shift", "jitter", "mosaic", "amp")
PLOTS_DIR = "eval"  # per-class table, PR curves, confusion matrix, worst images (decodet.evaluation.analysis)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the final metrics. Single-process or under ``torchrun`` (joins the
    process group itself). Raises DecodetError for bad config or data, a non-finite loss (naming the step; the
    last good checkpoint is left intact), an unreadable state file to resume from."""
    created_group = not D.is_dist()
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(cfg)
        try:
            return trainer.fit()
        except (RuntimeError, EOFError, ConnectionError) as exc:  # a data loader worker died: one line that says so
            error = faults.loader_worker_error(exc, trainer.run_dir, trainer.loader_iter)
            if error is None:
                raise
            raise error from None
        finally:
            trainer.close()
    finally:
        torch.set_num_threads(threads)  # cfg.threads applies to this run only
        if created_group:
            D.cleanup()


class Trainer:
    """Holds everything one training run needs; :meth:`fit` runs it (module docstring)."""

    def __init__(self, cfg: TrainConfig) -> None:
        given, state = self._start(cfg)
        self._build_model(given, state)
        self.sampler, self.loader_generator, self.train_loader, self.batches_per_epoch = build_train_loader(
            self.cfg, self.train_set, self.info
        )
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.cfg.accumulate)
        self.loader_iter: Any = None  # the epoch's iterator over train_loader (its worker processes)
        self._build_optimization(given)
        self._init_progress(state)
        self.model = self.raw_model
        if self.info.distributed:
            unused = probe_unused(self.raw_model, self.criterion, self.train_set, self.device, self.cfg.amp)
            self.model = D.wrap_ddp(self.raw_model, self.info, find_unused_parameters=bool(unused))
        self.run_dir = self._run_dir(state)  # created once everything above has succeeded
        self._open_run_files(resumed=state is not None)
        self._log_setup()

    def _start(self, cfg: TrainConfig) -> tuple[TrainConfig, dict[str, Any] | None]:
        """Check the config, join the process group, apply the process settings, read the state to resume;
        sets ``self.cfg`` (resolved) and returns ``(the config as given, the state)``."""
        cfg.validate()
        if cfg.tensorboard:
            require_tensorboard()  # every rank, before any work: a clear error when it is not installed
        self.info = D.init_distributed(cfg.device)
        self.device = self.info.device
        self.is_main = self.info.is_main
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise DecodetError("amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
        set_determinism(cfg.deterministic, self.device)
        cfg = faults.continue_elastic_run(cfg)  # restarted by torchrun: resume the job's run folder
        state = load_state(cfg.resume) if cfg.resume else None
        self.cfg = resolve(cfg)  # what the user left unset (``cfg``) is sized to the run
        if self.cfg.channels_last is None:  # a resumed run's saved config already holds its choice
            self.cfg = dataclasses.replace(self.cfg, channels_last=channels_last_for(self.device))
        return cfg, state

    def _build_model(self, given: TrainConfig, state: dict[str, Any] | None) -> None:
        """Datasets, the data recipe's choices, model (identical initialisation on every rank), criterion;
        resolves amp auto."""
        spec, self.train_set = open_train_set(self.cfg)
        if state is None:
            stats = DataStats.of(self.train_set.records)
            self.cfg = apply_data_recipe(given, self.cfg, stats, log_choices=self.is_main)
        else:  # a resumed run keeps the data recipe's saved choices for what is still unset
            saved = state.get("train_config", {})
            kept = {k: saved[k] for k in RECIPE_CHOICES if getattr(given, k) is None and k in saved}
            self.cfg = dataclasses.replace(self.cfg, **kept)
        cfg = self.cfg
        if cfg.start_imgsz is not None and (cfg.transforms != "light" or cfg.start_imgsz >= (cfg.imgsz or 0)):
            raise DecodetError(
                f"start_imgsz {cfg.start_imgsz} needs the light recipe and a larger imgsz "
                f"(got transforms {cfg.transforms!r}, imgsz {cfg.imgsz})"
            )
        seed_everything(cfg.seed)
        self.model_cfg = mcfg = run_model_config(cfg, state, self.train_set)
        check_labels_fit(mcfg, self.train_set)
        self.val_set = add_transforms(cfg, spec, self.train_set, input_normalized(mcfg))
        model = build_from_config(mcfg)
        if cfg.weights and state is None:
            from decodet.io.checkpoint import load_weights_into

            load_weights_into(model, cfg.weights)
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.raw_model = model
        self.criterion = build_criterion(mcfg, **cfg.loss_overrides).to(self.device)
        self.cfg = resolve_amp(cfg, model, self.criterion, self.train_set, self.device)  # amp auto

    def _build_optimization(self, given: TrainConfig) -> None:
        """AdamW, the lr schedule and EMA sized to the run (warm-ups), the fp16 grad scaler."""
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.raw_model, self.cfg)
        self.cfg, self.scheduler, self.ema = build_schedule(
            given, self.cfg, self.raw_model, self.optimizer, self.steps_per_epoch
        )  # the config with the warm-ups used
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.cfg.amp == "fp16")

    def _init_progress(self, state: dict[str, Any] | None) -> None:
        """Progress counters, at zero or where the resumed run stopped."""
        self.epoch = 0  # the epoch to run next (0-based)
        self.batches_done = 0  # batches of ``self.epoch`` already trained (mid-epoch resume)
        self.global_step = 0  # optimizer steps so far
        self.best = -math.inf
        self.early_stopping = EarlyStopping(self.cfg.patience, BEST_METRIC)
        self.stop_reason = "epochs done"
        self.resume_rng: dict[str, Any] | None = None
        self.stop_rng: dict[str, Any] | None = None
        if state is not None:
            restore_checkpoint(self, state)

    def _run_dir(self, state: dict[str, Any] | None) -> Path:
        """The resumed run's folder, or project/name (name-2, ... when taken), made by rank 0 and broadcast."""
        if state is not None:
            return Path(state["path"]).parent
        path = None
        if self.is_main:
            path = base = Path(self.cfg.project) / str(self.cfg.name)
            n = 2
            while not self.cfg.exist_ok and path.exists() and any(path.iterdir()):
                path = base.with_name(f"{base.name}-{n}")
                n += 1
            path.mkdir(parents=True, exist_ok=True)
            faults.mark_run(path)
            path = str(path)
        return Path(D.broadcast_object(path))

    def _open_run_files(self, resumed: bool) -> None:
        """Rank 0: the config file, the metrics log (records after the saved state, or of an earlier run in a
        reused folder, dropped) and TensorBoard."""
        self.metrics = None
        if self.is_main:
            remove_stale_temp_files(self.run_dir)
            self.cfg.save(self.run_dir / CONFIG_FILE)
            self.metrics = MetricsLogger(self.run_dir)
            dropped = self.metrics.drop_after("step", self.global_step if resumed else -1)
            if dropped and not resumed:
                log.info("%s: starting afresh, %d metric records of an earlier run dropped", self.run_dir, dropped)
        self.tb = TensorBoardLogger(self.run_dir) if self.cfg.tensorboard and self.is_main else None

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self.budget = TrainingBudget(cfg.time_budget_min, cfg.fit_schedule, self.device, cfg.max_steps)
        self.progressive = ProgressiveSize(cfg.start_imgsz, cfg.start_fraction, int(cfg.imgsz or 0), self.is_main)
        final: dict[str, Any] = {}
        stop = cfg.max_steps is not None and self.global_step >= cfg.max_steps
        while self.epoch < cfg.epochs and not stop:
            epoch = self.epoch
            t0 = time.monotonic()
            train_stats, stop = self._train_epoch(epoch)
            epoch_time = time.monotonic() - t0
            finished = self.batches_done == 0  # the epoch ran to its end
            last = stop or (finished and self.epoch >= cfg.epochs)
            with self.budget.paused():  # evaluation, logging and saving are not training time
                eval_stats, early_stop = self._end_epoch(epoch, train_stats, epoch_time, last)
            stop = stop or early_stop
            final = {**train_stats, **eval_stats, "epoch": epoch + 1, "step": self.global_step}
        if self.stop_reason.startswith("early stopping") and cfg.plots:
            self._evaluate_best_with_plots()
        final.update({"best_" + BEST_METRIC: self.best if self.best > -math.inf else None})
        final["stop_reason"] = self.stop_reason
        final["run_dir"] = str(self.run_dir)
        return final

    def _end_epoch(
        self, epoch: int, train_stats: dict[str, float], epoch_time: float, last: bool
    ) -> tuple[dict[str, float], bool]:
        """Evaluate (when due), track the best AP and patience, log the epoch's record, save; returns
        (eval stats, stop). The record is written before the checkpoint: a kill between the two leaves a
        record past the saved step, which a resume drops and replays, where the other order would
        leave a saved epoch without its record."""
        cfg = self.cfg
        eval_stats: dict[str, float] = {}
        due = bool(cfg.eval_every) and (epoch + 1) % cfg.eval_every == 0
        # still training at --start-imgsz: a model not yet trained at imgsz scores about 0 there, so no curve point
        if self.val_set is not None and (last or (due and self.progressive.done)):
            eval_stats = self._evaluate(plots=last and cfg.plots, subset=0 if last else cfg.eval_subset)
        record = {"epoch": epoch + 1, "step": self.global_step, **train_stats, "epoch_time": epoch_time}
        record.update({f"val/{k}": v for k, v in eval_stats.items()})
        # a subset's AP is a curve point, not comparable with a full evaluation's for "best" or patience
        full_eval = bool(eval_stats) and "subset" not in eval_stats
        improved = full_eval and eval_stats[BEST_METRIC] > self.best
        if improved:
            self.best = eval_stats[BEST_METRIC]
        reason = self.early_stopping.update(improved, self.best) if full_eval and not last else None
        if reason:  # the same on every rank: evaluation results are broadcast
            self.stop_reason = reason
            record["stop_reason"] = reason
            if self.is_main:
                log.info("%s; stopped after epoch %d, the best weights are in %s", reason, epoch + 1, BEST_WEIGHTS)
        if self.is_main:
            self._log_epoch(record)
        save_checkpoint(self, improved)
        return eval_stats, bool(reason)

    def _train_epoch(self, epoch: int) -> tuple[dict[str, float], bool]:
        """One epoch (or its remainder); returns (mean loss terms, lr, throughput) and whether to stop."""
        cfg, model = self.cfg, self.raw_model
        ddp = self.model
        ddp.train()
        self.criterion.train()
        seed = epoch_seed(cfg.seed, epoch, self.info.rank)
        self.sampler.set_epoch(epoch)
        self.sampler.start = self.batches_done * cfg.batch_size
        self.loader_generator.manual_seed(seed + 1)
        if self.batches_done and self.resume_rng is not None:
            set_rng_state(self.resume_rng)
        else:
            seed_everything(seed)
        self.resume_rng = None

        first, total = self.batches_done, self.batches_per_epoch
        accum = cfg.accumulate
        sums: Tensor | None = None
        keys: list[str] = []
        count = images_seen = 0
        stop = False
        t0 = time.monotonic()
        batches = len(self.train_loader)
        self.loader_iter = iter(self.train_loader)  # kept: a dead worker is named from its processes (train())
        bar = progress(self.loader_iter, total=batches, desc=f"epoch {epoch + 1}/{cfg.epochs}")
        with bar:
            for i, (images, targets) in enumerate(bar, start=first):
                group_start = i - i % accum
                group_size = min(accum, total - group_start)
                step_now = i + 1 - group_start == group_size
                losses, loss_value = self._forward_backward(images, targets, group_size, step_now, epoch, i)
                if not keys:
                    keys = [k for k in losses if k == "loss" or re.fullmatch(r"loss_[a-z0-9]+", k)]
                logged = torch.stack([losses[k].detach().float() for k in keys])
                sums = logged if sums is None else sums + logged
                count += 1
                images_seen += images.shape[0]
                if step_now:
                    self._optimizer_step(model)
                    if self.tb is not None:
                        self.tb.log_step(self.global_step, loss_value)
                    stop = self._should_stop()
                    if stop:  # the RNG states a mid-epoch resume continues from
                        self.stop_rng = get_rng_state()
                bar.set_postfix(loss=loss_value, lr=self.optimizer.param_groups[-1]["lr"])
                if stop:
                    break
        done = first + count
        self.batches_done = 0 if done >= total else done
        if self.batches_done == 0:
            self.epoch = epoch + 1
        elapsed = time.monotonic() - t0

        stats: dict[str, float] = {}
        if sums is not None:
            means = D.all_reduce_mean(sums / count).tolist()
            stats = {f"train/{k}": v for k, v in zip(keys, means)}
        for group in self.optimizer.param_groups:
            stats[f"lr/{group.get('name', 'group')}"] = group["lr"]
        stats["images_per_s"] = images_seen * self.info.world_size / max(elapsed, 1e-9)
        return stats, stop

    def _forward_backward(
        self, images: Tensor, targets: list[dict[str, Any]], group_size: int, step_now: bool, epoch: int, batch: int
    ) -> tuple[dict[str, Tensor], float]:
        """Forward, loss, finiteness check, backward of one micro-batch; returns (loss terms, loss value)."""
        cfg, ddp = self.cfg, self.model
        images = images.to(self.device, non_blocking=True)
        side = self.progressive.side(self._trained_s(), self._budget_s(), self.global_step, self._total_steps())
        if side is not None:
            images = resize_batch(images, side)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = [
            {"labels": t["labels"].to(self.device, non_blocking=True), "boxes": t["boxes"].to(self.device)}
            for t in targets
        ]
        # DDP syncs gradients only on the micro-batch that ends an accumulation group
        no_sync = ddp.no_sync() if (self.info.distributed and not step_now) else contextlib.nullcontext()
        with no_sync:
            with autocast(self.device, cfg.amp):
                # denoising queries are built from the targets (models.denoising); other models take images only
                outputs = ddp(images, targets) if getattr(self.raw_model.config, "denoising", 0) else ddp(images)
            losses = self.criterion(outputs, targets)  # the criterion computes in fp32 (or fp64)
            loss = losses["loss"]
            loss_value = float(D.all_reduce_mean(loss.detach()).item())  # the one sync per step
            if not math.isfinite(loss_value):
                raise self._nonfinite_error(loss_value, epoch, batch)
            self.scaler.scale(loss / group_size if group_size > 1 else loss).backward()
        return losses, loss_value

    def _trained_s(self) -> float:
        """Training seconds so far; before this process's first step, a resumed run's saved clock included."""
        seconds = self.budget.seconds()
        if self.budget.spent_before is None:
            seconds += float(getattr(self.scheduler.lr_lambdas[0], "spent_s", 0.0))
        return seconds

    def _budget_s(self) -> float | None:
        return self.cfg.time_budget_min * 60 if self.cfg.time_budget_min else None

    def _total_steps(self) -> int:
        """The run's planned optimizer steps (the schedule's, capped by ``max_steps``)."""
        total = int(self.scheduler.lr_lambdas[0].total_steps)
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    def _optimizer_step(self, model: nn.Module) -> None:
        if self.cfg.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(model)
        self.global_step += 1

    def _should_stop(self) -> bool:
        cfg = self.cfg
        factor = self.scheduler.lr_lambdas[0]
        self.budget.step(factor, self.global_step, self.is_main, self.ema)
        why = ""
        if cfg.max_steps is not None and self.global_step >= cfg.max_steps:
            why = "max_steps reached"
        elif factor.fitted and self.global_step >= factor.total_steps:
            why = "the schedule sized to the time budget is complete"
        if self.budget.over() and not why:
            why = "time budget reached"
        if why:
            self.stop_reason = why
            if self.is_main:
                lr = self.optimizer.param_groups[-1]["lr"]
                log.info("stopping after step %d (%s; lr %.3g)", self.global_step, why, lr)
        return bool(why)

    def _nonfinite_error(self, value: float, epoch: int, batch: int) -> DecodetError:
        last = self.run_dir / LAST_WEIGHTS
        kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was written yet"
        return DecodetError(
            f"non-finite loss ({value}) at step {self.global_step + 1} (epoch {epoch + 1}, batch {batch + 1}); "
            f"training stopped and {kept} — try a lower --lr or --amp none"
        )

    def _eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.raw_model

    def _evaluate(self, model: nn.Module | None = None, plots: bool = False, subset: int = 0) -> dict[str, float]:
        """COCO stats of ``model`` (default: EMA or raw) on the val set or its first ``subset`` images (then a
        ``subset`` stat: the image count)."""
        data: Dataset = self.val_set
        if 0 < subset < len(self.val_set):
            data = torch.utils.data.Subset(self.val_set, range(subset))
        stats = evaluate(
            model or self._eval_model(),
            data,
            gt=self.val_set.ann_file,
            device=self.device,
            batch_size=self.cfg.eval_batch_size or eval_batch_size(self.cfg.transforms, self.cfg.batch_size),
            workers=self.cfg.workers,
            amp=self.cfg.amp,
            max_det=100,
            channels_last=self.cfg.channels_last,
            plots_out=self.run_dir / PLOTS_DIR if plots else None,
        )
        return {**stats, "subset": len(data)} if data is not self.val_set else stats

    def _evaluate_best_with_plots(self) -> None:
        """After early stopping, the end-of-training plots describe the kept (best) weights."""
        from decodet.io.checkpoint import load_model

        D.barrier()  # rank 0 wrote the file
        best = self.run_dir / BEST_WEIGHTS
        if best.is_file():
            self._evaluate(load_model(best, map_location=self.device), plots=True)

    def _log_setup(self) -> None:
        if self.is_main:
            n_params = sum(p.numel() for p in self.params)
            n_val = len(self.val_set) if self.val_set is not None else None
            log_run_start(self.cfg, self.model_cfg.num_classes, n_params, self.device, self.info.world_size,
                          len(self.train_set), n_val, self.run_dir, self.steps_per_epoch)  # fmt: skip

    def _log_epoch(self, record: dict[str, Any]) -> None:
        self.metrics.log(record)
        if self.tb is not None:
            self.tb.log_record(record)
            if f"val/{BEST_METRIC}" in record:  # a few validation images with the model's boxes, drawn square
                size = None if self.cfg.transforms == "detr" else self.cfg.imgsz  # but DECO's keep-aspect resize
                self.tb.log_images(self._eval_model(), self.val_set, record["step"], self.device, size)
        plot_curves(self.run_dir)
        summary = ", ".join(
            f"{k.split('/')[-1]} {v:.4g}" for k, v in record.items() if k in ("train/loss", "val/AP", "val/AP50")
        )
        log.info("epoch %d (step %d, %.0f s): %s", record["epoch"], record["step"], record["epoch_time"], summary)

    def close(self) -> None:
        self.train_loader = None  # type: ignore[assignment]
        if getattr(self, "tb", None) is not None:
            self.tb.close()
            self.tb = None
