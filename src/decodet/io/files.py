"""Reading JSON / YAML files with one-line errors: a :class:`DecodetError` naming the file and
what is wrong (missing, unreadable, not UTF-8, malformed at line L column C, wrong top level).

Every reader of a user's JSON or YAML file (COCO annotations, detection results, dataset
files, training configs) goes through here, so the messages are the same everywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from decodet.errors import DecodetError


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """The parsed JSON document of ``path`` (``what`` names the file in error messages)."""
    path = Path(path)
    return _parse(path, _read_bytes(path, what), json_only=True)


def read_mapping(path: str | os.PathLike, what: str = "file", expected: str | None = None) -> dict[str, Any]:
    """The top-level mapping of a JSON (``.json``) or YAML (anything else) file.

    ``expected`` is the error message when the top level is not a mapping.
    """
    path = Path(path)
    data = _parse(path, _read_bytes(path, what), json_only=path.suffix.lower() == ".json")
    if not isinstance(data, dict):
        raise DecodetError(expected or f"{what} must hold a mapping", path)
    return data


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DecodetError(f"{what} not found", path) from None
    except OSError as e:
        raise DecodetError(f"cannot read {what}: {e.strerror or e}", path) from None


def _parse(path: Path, raw: bytes, json_only: bool) -> Any:
    # bytes, not text: json and yaml detect UTF-8 / UTF-16 and a byte-order mark themselves
    try:
        return json.loads(raw) if json_only else yaml.safe_load(raw)
    except json.JSONDecodeError as e:
        raise DecodetError(f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}", path) from None
    except UnicodeDecodeError as e:
        raise DecodetError(f"not a UTF-8 text file ({e.reason})", path) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise DecodetError(f"malformed YAML{where}: {problem}", path) from None
