"""Crash-safe file writes: write to a temporary file beside the target, fsync, rename.

A reader never sees a half-written file: either the old content or the new one.  A write
that fails (no space left, no permission, ...) removes its temporary file, leaves the previous
version of the target untouched and raises a one-line :class:`DecodetError` naming the target
and the operating system's reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from decodet.errors import DecodetError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    An ``OSError`` raised while writing becomes a :class:`DecodetError` naming ``path``.

    >>> with atomic_path("ckpt.safetensors") as tmp:
    ...     save_file(tensors, tmp)
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        kept = "the previous version is left intact" if path.exists() else "nothing was written"
        raise DecodetError(f"cannot write the file ({exc.strerror or exc}); {kept}", path) from None
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


class _Writer:
    """A binary file for serialisers (``torch.save``) that keeps the first ``OSError`` of a write:
    torch's C++ writer replaces it by an opaque ``RuntimeError``, :func:`atomic_open` re-raises it."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return _write(self.file, data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.file.flush()


def _write(file: BinaryIO, data: bytes) -> int:
    """Where every byte of :func:`atomic_open` goes to the disk."""
    return file.write(data)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[_Writer]:
    """A binary file to write (``write``, ``flush``) that replaces ``path`` atomically on success.

    Serialise through it rather than to a path (``torch.save(obj, f)``, ``f.write(bytes)``) so a
    failing write (disk full) surfaces as a :class:`DecodetError` that says why.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer = _Writer(f)
        try:
            yield writer
        except Exception:
            if writer.error is not None:
                raise writer.error from None
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(folder: Path) -> None:
    """Delete the temp files of atomic writes (``.<name>.<random>.tmp``) that a killed process left."""
    for tmp in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            log.info("removed %s, left by an interrupted write", tmp)
