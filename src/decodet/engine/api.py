"""``decodet.train(...)``: the ``decodet train`` command as one Python call.

>>> result = decodet.train(model="decoplus_r18", weights="decoplus_r18.coco", data="my_dataset", epochs=12)
>>> result.metrics["AP"], result.run_dir, result.best
>>> detections = decodet.Detector(result.run_dir)("photo.jpg")

Keyword options are the fields of :class:`~decodet.engine.train_config.TrainConfig` — the
command line's flags with ``_`` for ``-`` (``batch_size=8``, ``max_steps=100``,
``model_overrides={"drop_path": 0.1}`` for ``--set drop_path=0.1``).  As on the command line,
``config=FILE`` supplies a base config that the options override, and ``resume=RUN`` continues
a run from its saved config.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from decodet.engine.train_config import TrainConfig, config_from_namespace
from decodet.errors import DecodetError


@dataclass
class TrainResult:
    """What a training run leaves: its final metrics and where its weights are.

    ``metrics``: the last evaluation's COCO stats (``AP``, ``AP50``, ...; absent when there
    is no validation split), the last epoch's mean losses, ``epoch``, ``step`` and ``best_AP``.
    ``best``: ``best.safetensors`` when an evaluation ran, else ``last.safetensors``.
    """

    metrics: dict[str, Any]
    run_dir: Path
    best: Path
    last: Path


def train(
    model: str | None = None,
    data: str | os.PathLike | None = None,
    epochs: int | None = None,
    *,
    config: str | os.PathLike | None = None,
    **options: Any,
) -> TrainResult:
    """Train a detector; the arguments are ``decodet train``'s flags (module docstring).

    Options left out take the config file's value, else the training recipe's default.

    Raises:
        DecodetError: an unknown option (the message lists the valid ones), a bad value, bad data.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        valid = ", ".join(sorted(fields | {"config"}))
        raise DecodetError(f"unknown training option(s) {', '.join(unknown)}; valid options: {valid}")
    given = {"model": model, "data": data, "epochs": epochs}
    options.update({k: v for k, v in given.items() if v is not None})
    options = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in options.items()}
    if config is not None:
        options["config"] = os.fspath(config)
    cfg = config_from_namespace(argparse.Namespace(**options))

    from decodet.engine.trainer import BEST_WEIGHTS, LAST_WEIGHTS
    from decodet.engine.trainer import train as run_training

    metrics = dict(run_training(cfg))
    run_dir = Path(metrics.pop("run_dir"))
    best, last = run_dir / BEST_WEIGHTS, run_dir / LAST_WEIGHTS
    return TrainResult(metrics=metrics, run_dir=run_dir, best=best if best.is_file() else last, last=last)


__all__ = ["TrainResult", "train"]
