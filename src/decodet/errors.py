"""The one error type for user mistakes (bad files, bad arguments, bad data)."""

from __future__ import annotations

from collections.abc import Iterable


class DecodetError(Exception):
    """A problem the user can fix: the message names the file (if any) and what is wrong.

    The CLI prints it on one line and exits with status 2; library callers can catch it.
    """

    def __init__(self, message: str, path: object | None = None) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


def reject_unknown(given: Iterable[str], known: Iterable[str], what: str, path: object | None = None) -> None:
    """Raise ``DecodetError("unknown {what} [...]; known: [...]")`` if ``given`` names a key
    outside ``known`` (config fields, training options, criterion options)."""
    known = sorted(known)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise DecodetError(f"unknown {what} {unknown}; known: {known}", path)
