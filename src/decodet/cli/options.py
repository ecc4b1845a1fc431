"""Flags generated from an options dataclass (:class:`~decodet.runtime.options.RunOptions`,
:class:`~decodet.serve.config.ServeConfig`): one flag per field that has help in its metadata,
with the field's default, its type (or the metadata's ``type``), ``flag`` and any other
``add_argument`` keyword (``choices``, ``nargs``) in the metadata."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from collections.abc import Iterable
from typing import Any

from decodet.runtime.options import RunOptions
from decodet.utils.annotations import scalar_type


def add_options(
    parser: argparse.ArgumentParser,
    cls: type = RunOptions,
    skip: Iterable[str] = (),
    only: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """Add ``cls``' fields to ``parser`` as flags (``only`` these, or all but ``skip``), with
    this command's ``defaults`` where they differ from the fields'."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta or f.name in skip or (only and f.name not in only):
            continue
        default, help_ = f.default, meta["help"]
        if defaults and f.name in defaults:  # this command's own: the field's "(default: ...)" does not apply
            default, help_ = defaults[f.name], re.sub(r" ?\(default:[^)]*\)", "", help_)
        shown = "" if default in (None, False) or "default" in help_ else f" (default: {default})"
        kw: dict[str, Any] = {"dest": f.name, "default": default, "help": help_ + shown}
        flags = meta.get("flag", ("--" + f.name.replace("_", "-"),))
        if hints[f.name] is bool:
            parser.add_argument(*flags, action="store_true", **kw)
        else:
            extra = {k: v for k, v in meta.items() if k not in ("help", "flag", "type")}  # choices, nargs, ...
            kw["metavar"] = None if "choices" in meta else flags[0].lstrip("-").replace("-", "_").upper()
            parser.add_argument(*flags, type=meta.get("type", scalar_type(hints[f.name])), **extra, **kw)


def options_from(args: argparse.Namespace, cls: type = RunOptions) -> Any:
    """The ``cls`` that parsed flags describe (fields without a flag keep their defaults)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
