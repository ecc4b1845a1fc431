"""Problems found while reading a dataset: each with its file and line (or annotation id), counted by kind.

Readers keep going past a bad label line, box or annotation file: they record a :class:`Problem`, skip
the item, and log one warning per dataset that counts each kind (the COCO loader's convention).
``decodet data check`` lists them one by one.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """One problem: ``kind`` (what is wrong, counted), where it is, and an optional ``detail``."""

    kind: str
    file: Path
    line: int | None = None
    annotation_id: int | None = None
    detail: str = ""

    @property
    def where(self) -> str:
        """``file``, ``file:line`` or ``file: annotation <id>``."""
        where = str(self.file)
        if self.line is not None:
            where += f":{self.line}"
        if self.annotation_id is not None:
            where += f": annotation {self.annotation_id}"
        return where

    def __str__(self) -> str:
        return f"{self.where}: {self.kind}" + (f" ({self.detail})" if self.detail else "")


class Problems:
    """An ordered list of :class:`Problem` with counts per kind."""

    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(
        self, kind: str, file: Path, line: int | None = None, detail: str = "", annotation_id: int | None = None
    ) -> None:
        self.items.append(Problem(kind, Path(file), line, annotation_id, detail))

    def extend(self, other: Problems) -> None:
        self.items.extend(other.items)

    def counts(self) -> Counter:
        return Counter(p.kind for p in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def summary(self) -> str:
        """``"3 label lines with ... (first: file:line), 1 ... (first: file)"`` or ``""``: each kind names its first."""
        first: dict[str, Problem] = {}
        for p in self.items:
            first.setdefault(p.kind, p)
        counts = self.counts()
        return ", ".join(
            f"{counts[kind]} {kind} (first: {p.where}" + (f": {p.detail})" if p.detail else ")")
            for kind, p in first.items()
        )

    def log(self, logger: logging.Logger, source: Path, action: str = "skipped") -> None:
        """One warning for the whole dataset (nothing when there is no problem)."""
        if self.items:
            logger.warning("%s: %s %s; run `decodet data check` for the full list", source, action, self.summary())
