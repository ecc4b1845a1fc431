"""Reading type annotations for the flags generated from dataclass fields (training and run options)."""

from __future__ import annotations

import types
import typing
from typing import Any


def scalar_type(tp: Any) -> Any:
    """``int | None`` -> ``int``; a union of several types -> ``str``; other types unchanged."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp
