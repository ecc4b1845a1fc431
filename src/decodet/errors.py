"""The one error type for user mistakes (bad files, bad arguments, bad data)."""

from __future__ import annotations


class DecodetError(Exception):
    """A problem the user can fix: the message names the file (if any) and what is wrong.

    The CLI prints it on one line and exits with status 2; library callers can catch it.
    """

    def __init__(self, message: str, path: object | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
