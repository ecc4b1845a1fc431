"""``TrainConfig``: every training setting in one typed, serialisable dataclass.

Fields left at ``None`` are filled by :func:`resolve` from the preset's recipe
(:func:`decodet.registry.train_recipe`): the authors' published one when the backbone starts from pretrained
weights (or ``--weights``), else a from-scratch one (nothing frozen, one higher lr for every parameter, a
linear warm-up and a cosine decay).

A config round-trips through YAML / JSON (:meth:`TrainConfig.save`, :meth:`TrainConfig.load`);
:func:`parse_train_args` builds one from command-line flags over an optional ``--config FILE``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from decodet.errors import DecodetError, reject_unknown
from decodet.io.atomic import atomic_write_text
from decodet.io.files import read_mapping
from decodet.registry import train_recipe
from decodet.utils.annotations import scalar_type

SCHEDULES = ("step", "cosine", "constant")
AMP_MODES = ("none", "bf16", "fp16", "auto")


@dataclass
class TrainConfig:
    """Training settings; ``None`` means "the preset's recipe" (:func:`decodet.registry.train_recipe`)."""

    # what to train, on what
    model: str = "deco_tiny"
    data: str = ""
    train_split: str = "train"
    val_split: str = "val"
    pretrained_backbone: bool = False
    weights: str | None = None  # initialise from a checkpoint (ours or the authors')
    model_overrides: dict[str, Any] = field(default_factory=dict)
    loss_overrides: dict[str, Any] = field(default_factory=dict)  # build_criterion options, e.g. weight_class

    # how long
    # None: 12, or with a time budget whose schedule is fitted to it, BUDGET_EPOCHS (the budget decides)
    epochs: int | None = None
    max_steps: int | None = None  # stop after this many optimizer steps in total
    time_budget_min: float | None = None  # stop cleanly after this many minutes of training steps
    # Plan the lr schedule to time_budget_min: time the steps and re-plan the rest of the schedule as they
    # run, so it completes (cosine reaches its floor) within the budget on this machine.  None: on whenever
    # time_budget_min is set.
    fit_schedule: bool | None = None

    # optimisation
    batch_size: int | None = None  # per process
    accumulate: int = 1  # micro-batches per optimizer step
    lr: float | None = None
    lr_backbone: float | None = None
    lr_encoder: float | None = None  # DECO's encoder group; None: same as lr
    weight_decay: float | None = None
    norm_bias_decay: bool | None = None  # weight decay on norm weights and biases too (DECO: yes, DECO+: no)
    schedule: str | None = None  # step | cosine | constant
    lr_drop_epoch: int | None = None  # step schedule; None: 2/3 of the epochs (100 of 150)
    lr_drop_factor: float = 0.1
    min_lr_ratio: float = 0.05  # cosine floor, as a fraction of the initial lr
    warmup_steps: int | None = None  # linear warm-up, in optimizer steps
    clip_grad: float | None = None  # max gradient norm; 0 disables clipping
    # none | bf16 | fp16 (fp16 on CUDA only, with a GradScaler) | auto (engine.amp_probe); None: the data
    # recipe's choice (engine.data_recipe: auto for a run long enough to pay for the probe)
    amp: str | None = None
    ema: bool | None = None
    ema_decay: float | None = None  # None: sized to the run (engine.run_plan.ema_decay_for), at most 0.9999
    # decay * (1 - exp(-updates / ema_warmup)); None: sized to the run (10% of its steps, at most 2000)
    ema_warmup: int | None = None

    # data
    imgsz: int | None = None  # square side (light / rtdetr recipes) or short side (detr)
    transforms: str | None = None  # augmentation recipe of decodet.data.transforms: detr | light | rtdetr
    multiscale: bool | None = None  # RT-DETR's per-batch random square size around imgsz
    # Progressive resizing (light recipe): the first start_fraction of the run (of its time budget, else of
    # its planned steps) trains on batches resized to start_imgsz, then on imgsz; evaluation, the checkpoint
    # and export use imgsz.  None: one size throughout.
    start_imgsz: int | None = None
    start_fraction: float = 0.5
    # light recipe's augmentation strength; None: by the dataset's size (engine.data_recipe)
    zoom: float | None = None  # random zoom range 1 +- zoom (0: none)
    shift: float | None = None  # random shift up to this fraction of the side (0: none)
    jitter: float | None = None  # brightness and contrast jitter 1 +- jitter (0: none)
    # Dense one-to-one targets (DEIM's Dense O2O, decodet.data.mosaic): the probability that a training
    # sample is four samples tiled 2x2; None: the data recipe's choice
    mosaic: float | None = None
    workers: int = 2
    eval_batch_size: int | None = None  # None: batch_size (1 for the detr recipe: no padding)

    # bookkeeping
    # evaluate every N epochs (and always after the last one); 0: only at the end; None: 1, or 10 when
    # the time budget decides the epochs (they may be many and short)
    eval_every: int | None = None
    eval_subset: int = 0  # >0: between epochs, evaluate on the first N val images only (a cheap curve)
    patience: int | None = None  # stop after this many evaluations without a better AP; None: never
    plots: bool = True  # per-class table, PR curves, confusion matrix, worst images after training
    tensorboard: bool = False  # TensorBoard event files in the run folder (needs the tensorboard package)
    project: str = "runs"
    name: str | None = None  # run folder project/name; None: the model name
    exist_ok: bool = False  # reuse project/name instead of picking name-2, name-3, ...
    resume: str | None = None  # run folder or its last_state.pt
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch.set_num_threads; None: torch's default
    channels_last: bool | None = None  # None: on for training on a CPU (decodet.engine.trainer)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path | None = None) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are a :class:`DecodetError`."""
        if not isinstance(data, dict):
            raise DecodetError(f"a training config must be a mapping of option names to values, got {data!r}", source)
        reject_unknown(data, (f.name for f in dataclasses.fields(cls)), "training option(s)", source)
        cfg = cls(**{k: _coerce(v, _field_types()[k]) for k, v in data.items()})
        cfg.validate(source)
        return cfg

    def save(self, path: str | Path) -> Path:
        """Write as YAML (``.yaml`` / ``.yml``) or JSON (anything else), atomically."""
        path = Path(path)
        if path.suffix.lower() in (".yaml", ".yml"):
            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write_text(path, text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(_read_config(path), source=path)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes``; unknown names are a :class:`DecodetError`."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def validate(self, source: str | Path | None = None) -> None:
        """Raise :class:`DecodetError` for values of the wrong type or out of range."""
        for name, tp in _field_types().items():
            value = getattr(self, name)
            if not _type_ok(value, tp):
                raise DecodetError(f"option {name!r} must be {_type_name(tp)}, got {value!r}", source)
        checks = [
            (self.epochs is None or self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size is None or self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.accumulate >= 1, f"accumulate must be >= 1, got {self.accumulate}"),
            (self.schedule is None or self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}"),
            (self.amp is None or self.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {self.amp!r}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.time_budget_min is None or self.time_budget_min > 0, "time_budget_min must be > 0"),
            (self.clip_grad is None or self.clip_grad >= 0, f"clip_grad must be >= 0, got {self.clip_grad}"),
            (self.ema_decay is None or 0 <= self.ema_decay < 1, f"ema_decay must lie in [0, 1), got {self.ema_decay}"),
            (self.ema_warmup is None or self.ema_warmup >= 0, f"ema_warmup must be >= 0, got {self.ema_warmup}"),
            (self.eval_every is None or self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}"),
            (self.eval_subset >= 0, f"eval_subset must be >= 0, got {self.eval_subset}"),
            (not self.fit_schedule or self.time_budget_min is not None, "fit_schedule needs time_budget_min"),
            (self.patience is None or self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
            (self.imgsz is None or self.imgsz >= 32, f"imgsz must be >= 32, got {self.imgsz}"),
            (self.start_imgsz is None or self.start_imgsz >= 32, f"start_imgsz must be >= 32, got {self.start_imgsz}"),
            (
                self.start_imgsz is None or self.imgsz is None or self.start_imgsz < self.imgsz,
                f"start_imgsz ({self.start_imgsz}) must be smaller than imgsz ({self.imgsz})",
            ),
            (0.0 < self.start_fraction < 1.0, f"start_fraction must lie in (0, 1), got {self.start_fraction}"),
            (
                self.start_imgsz is None or self.transforms in (None, "light"),
                f"start_imgsz needs the light recipe's square images, not transforms {self.transforms!r}",
            ),
            (not (self.start_imgsz and self.multiscale), "start_imgsz and multiscale cannot be combined"),
            (self.zoom is None or 0.0 <= self.zoom < 1.0, f"zoom must lie in [0, 1), got {self.zoom}"),
            (self.shift is None or 0.0 <= self.shift < 1.0, f"shift must lie in [0, 1), got {self.shift}"),
            (self.jitter is None or 0.0 <= self.jitter < 1.0, f"jitter must lie in [0, 1), got {self.jitter}"),
            (self.mosaic is None or 0.0 <= self.mosaic <= 1.0, f"mosaic must lie in [0, 1], got {self.mosaic}"),
            (self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
            (isinstance(self.model_overrides, dict), "model_overrides must be a mapping"),
            (isinstance(self.loss_overrides, dict), "loss_overrides must be a mapping"),
        ]
        for ok, message in checks:
            if not ok:
                raise DecodetError(message, source)


def resolve(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with every ``None`` recipe field filled from the preset's recipe. The backbone counts as
    pretrained when ``pretrained_backbone`` is set or ``weights`` are given. The recipe's model overrides sit
    under the user's ``model_overrides``."""
    pretrained = bool(cfg.pretrained_backbone or cfg.weights)
    recipe = train_recipe(cfg.model, pretrained)
    changes: dict[str, Any] = {}
    for key, value in recipe.items():
        if key in ("model_overrides", "loss_overrides"):
            changes[key] = {**value, **getattr(cfg, key)}
        elif getattr(cfg, key) is None:
            changes[key] = value
    # What the data recipe (decodet.engine.data_recipe) chooses where the data is read; without data, these.
    for key, value in FALLBACKS.items():
        if getattr(cfg, key) is None and key not in changes:
            changes[key] = value
    fit = cfg.time_budget_min is not None if cfg.fit_schedule is None else cfg.fit_schedule
    changes["fit_schedule"] = fit
    budget_decides = fit and cfg.time_budget_min is not None and cfg.epochs is None
    if cfg.epochs is None:
        changes["epochs"] = BUDGET_EPOCHS if budget_decides else 12
    if cfg.eval_every is None:
        changes["eval_every"] = 10 if budget_decides else 1
    if cfg.lr is not None and cfg.lr_backbone is None and not pretrained:
        changes["lr_backbone"] = cfg.lr  # from scratch: one learning rate unless told otherwise
    if cfg.name is None:
        changes["name"] = cfg.model
    return dataclasses.replace(cfg, **changes)


# With a time budget that the schedule is fitted to, and no --epochs, the budget decides the run's length:
# the configured total (epochs) is only an upper bound.  12 epochs of a few hundred images had ended a
# 3-minute run after 2.3 minutes (docs/convergence.md).
BUDGET_EPOCHS = 1000

# Values of the fields a run sizes to its data and length (engine.data_recipe, engine.run_plan) when
# resolved without them: the light recipe's augmentation, fp32, DECO+'s published EMA decay.
FALLBACKS: dict[str, Any] = {
    "zoom": 0.4, "shift": 0.1, "jitter": 0.2, "amp": "none", "ema_decay": 0.9999, "mosaic": 0.0,
}  # fmt: skip


def _read_config(path: str | Path) -> dict[str, Any]:
    return read_mapping(path, "training config", "a training config must be a mapping of option names to values")


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(value: Any, tp: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string: take such strings as numbers for float fields."""
    if isinstance(value, str) and float in typing.get_args(tp) + (tp,):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _type_ok(value: Any, tp: Any) -> bool:
    """Whether a (JSON / YAML) value fits a field annotation: ints pass for floats, bools only for bools."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(tp) or tp
    return isinstance(value, origin)


def _type_name(tp: Any) -> str:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(typing.get_origin(tp) or tp, "__name__", str(tp))


def _none_or(kind: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def parse_key_value(text: str) -> tuple[str, Any]:
    """``"KEY=VALUE"`` -> ``(KEY, VALUE read as YAML)``, with ``2e-3`` a number (YAML 1.1, which PyYAML
    follows, reads an exponent without a dot as a string)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str) and _EXPONENT.fullmatch(parsed.strip()):
        parsed = float(parsed)
    return key.strip(), parsed


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


# fields whose None default is filled by the preset's recipe (decodet.registry.train_recipe)
_RECIPE_FIELDS = {
    "lr", "lr_backbone", "lr_encoder", "weight_decay", "norm_bias_decay", "schedule", "warmup_steps", "ema",
    "imgsz", "transforms", "multiscale", "clip_grad", "batch_size",
}  # fmt: skip
# fields whose None default is chosen for the run: from the data (decodet.engine.data_recipe), the planned
# steps (ema_decay: decodet.engine.run_plan) or the time budget (fit_schedule); FALLBACKS without them
_RUN_FIELDS = {"amp", "ema_decay", "zoom", "shift", "jitter", "mosaic", "fit_schedule", "epochs", "eval_every"}
# fields for which the word "none" is a value, not "unset" (--amp none: fp32, which the data recipe keeps)
_NONE_IS_A_VALUE = {"amp"}
_HELP = {
    "model": "model preset (decodet.list_models())",
    "data": "dataset folder or data.yaml",
    "weights": "initialise from a checkpoint (ours or the authors'); class heads re-initialised if counts differ",
    "model_overrides": "model config override KEY=VALUE (repeatable), e.g. drop_path=0.1",
    "loss_overrides": "criterion option KEY=VALUE (repeatable), e.g. weight_class=2 (decodet.build_criterion)",
    "time_budget_min": "stop after this many minutes of training steps (evaluation not counted), then evaluate",
    "fit_schedule": "with --time-budget-min (on by default then): time the steps and re-plan the lr schedule to "
    "end in the budget",
    "eval_subset": "evaluate on the first N validation images between epochs (the final evaluation uses all)",
    "resume": "continue a run: its folder or its last_state.pt",
    "amp": "mixed precision: none | bf16 | fp16 (CUDA) | auto (bf16 where it trains faster, timed at start); "
    "unset: auto for a run long enough to time it",
    "ema_decay": "EMA decay (when unset: sized to the run, an average over about 10%% of its steps, at most 0.9999)",
    "clip_grad": "max gradient norm, 0: no clipping",
    "channels_last": "channels-last activations and weights (when unset: on for a CPU, where a step is 3%% to 12%% "
    "faster; off on CUDA, not measured)",
    "ema_warmup": "EMA warm-up in updates (when unset: 10%% of the run's steps, at most 2000)",
    "warmup_steps": "linear lr warm-up in steps (when unset: the recipe's, at most 5%% of the run's steps)",
    "schedule": "lr schedule: step | cosine | constant",
    "transforms": "augmentation recipe: detr | light | rtdetr",
    "lr_encoder": "DECO encoder's learning rate (none: same as --lr)",
    "lr_drop_epoch": "step schedule's drop epoch (none: 2/3 of the epochs)",
    "max_steps": "stop after this many optimizer steps in total, then evaluate and save",
    "eval_every": "evaluate every N epochs (0: only at the end; unset: 1, or 10 when the time budget decides)",
    "epochs": "epochs to train (unset: 12, or as many as --time-budget-min fits when the schedule is fitted)",
    "patience": "early stopping: stop after N evaluations without a better AP (best weights kept)",
    "plots": "write per-class AP, PR curves, confusion matrix and worst images after training",
    "tensorboard": "write TensorBoard event files (losses, learning rates, mAP, val images) to the run folder",
    "mosaic": "probability that a training sample is four samples tiled 2x2 at half size (denser one-to-one "
    "targets, DEIM's Dense O2O); 0: never",
    "start_imgsz": "progressive resizing: train the first --start-fraction of the run on batches resized to "
    "this side, then at --imgsz (evaluation, checkpoint and export use --imgsz)",
    "start_fraction": "the fraction of the run (of its time budget, else of its steps) trained at --start-imgsz",
    "zoom": "light recipe: random zoom in 1 +- ZOOM while training (0: none; unset: by the dataset's size)",
    "shift": "light recipe: random shift of up to SHIFT of the image side while training (0: none)",
    "jitter": "light recipe: brightness and contrast jitter 1 +- JITTER while training (0: none)",
}


def build_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add one ``--flag`` per :class:`TrainConfig` field (plus ``--config FILE``) to ``parser``. Every flag
    defaults to ``argparse.SUPPRESS`` so that only flags actually given override the config file (or the
    resumed run's config)."""
    parser = parser or argparse.ArgumentParser(prog="decodet train", description="Train a DECO / DECO+ detector.")
    parser.add_argument("--config", default=argparse.SUPPRESS, help="YAML/JSON training config; flags override it")
    types_ = _field_types()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = types_[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "by recipe" if f.name in _RECIPE_FIELDS else "for the run" if f.name in _RUN_FIELDS else default
        help_ = _HELP.get(f.name, "") + (f" (default: {shown})" if shown not in (None, "", {}) else "")
        if f.name in ("model_overrides", "loss_overrides"):
            option = "--set" if f.name == "model_overrides" else "--loss"
            parser.add_argument(
                option, dest=f.name, metavar="KEY=VALUE", type=parse_key_value, action="append",
                default=argparse.SUPPRESS, help=_HELP[f.name],
            )  # fmt: skip
            continue
        kind = scalar_type(tp)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        else:
            parse = kind if f.name in _NONE_IS_A_VALUE else _none_or(kind)
            parser.add_argument(flag, type=parse, default=argparse.SUPPRESS, help=help_, metavar=f.name.upper())
    return parser


def config_from_namespace(ns: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` that parsed flags describe. Base: ``--config FILE`` if given; with
    ``--resume`` (and no ``--config``) the resumed run's saved ``train_config.yaml``; otherwise the defaults.
    Given flags override the base."""
    given = {k: v for k, v in vars(ns).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    config_file = getattr(ns, "config", None)
    if config_file:
        base = _read_config(config_file)
    elif given.get("resume"):
        base = TrainConfig.load(run_config_path(given["resume"])).to_dict()
    else:
        base = {}
    for key in ("model_overrides", "loss_overrides"):
        if key in given:
            given[key] = {**base.get(key, {}), **dict(given[key])}
    return TrainConfig.from_dict({**base, **given}, source=config_file)


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    """``decodet train`` flags -> :class:`TrainConfig` (see :func:`config_from_namespace`)."""
    return config_from_namespace(build_arg_parser().parse_args(argv))


def run_config_path(resume: str | Path) -> Path:
    """The saved ``train_config.yaml`` of the run that ``resume`` (folder or state file) names."""
    path = Path(resume)
    folder = path if path.is_dir() else path.parent
    cfg_path = folder / "train_config.yaml"
    if not cfg_path.is_file():
        raise DecodetError("cannot resume: no train_config.yaml in the run folder", folder)
    return cfg_path
