"""Flags generated from an options dataclass (:class:`~decodet.runtime.options.RunOptions`,
:class:`~decodet.serve.config.ServeConfig`): one flag per field that has help in its metadata,
with the field's default, its type (or the metadata's ``type``), ``choices`` and ``flag``."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any

from decodet.runtime.options import RunOptions


def _scalar(tp: Any) -> Any:
    """``int | None`` -> ``int``; other types unchanged."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def add_options(
    parser: argparse.ArgumentParser, cls: type = RunOptions, skip: Iterable[str] = (), only: Iterable[str] = ()
) -> None:
    """Add ``cls``' fields to ``parser`` as flags (``only`` these, or all but ``skip``)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta or f.name in skip or (only and f.name not in only):
            continue
        shown = "" if f.default in (None, False) or "default" in meta["help"] else f" (default: {f.default})"
        kw: dict[str, Any] = {"dest": f.name, "default": f.default, "help": meta["help"] + shown}
        flags = meta.get("flag", ("--" + f.name.replace("_", "-"),))
        if hints[f.name] is bool:
            parser.add_argument(*flags, action="store_true", **kw)
        else:
            parser.add_argument(
                *flags, type=meta.get("type", _scalar(hints[f.name])), choices=meta.get("choices"), **kw
            )


def options_from(args: argparse.Namespace, cls: type = RunOptions) -> Any:
    """The ``cls`` that parsed flags describe (fields without a flag keep their defaults)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
