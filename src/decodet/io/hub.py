"""Named pretrained weights: the authors' released checkpoints, downloaded once into a cache.

A name from :data:`WEIGHTS` is accepted wherever a weights path is (``load_model``, ``Detector``, ``--weights``
of train / eval / predict / export), e.g. ``decodet.load_model("decoplus_r18.coco")``.

The file is fetched from ``$DECODET_HUB`` (default: the authors' GitHub release) into ``$DECODET_CACHE/weights``
(default ``~/.cache/decodet/weights``) on first use:

- with a progress bar, into ``<file>.part`` renamed when complete; an interrupted download (dropped connection,
  killed process) resumes from the ``.part`` file with an HTTP ``Range`` request, here (a few retries) or on
  the next use;
- its SHA-256 is recorded beside it (``<file>.sha256.json``) and checked at every later use, so a file changed
  or damaged in the cache is refused with the command that clears it;
- offline, the error names the URL to fetch by hand and the path to save it at (a file placed there by hand
  has its checksum recorded at first use).

Downloads use the standard library's ``urllib``: one GET with a ``Range`` header is all this needs, and it keeps
the package free of an HTTP client dependency (requests / httpx)."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from decodet.errors import DecodetError
from decodet.io.atomic import _fsync_dir, atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_HUB = "https://github.com/xinghaochen/DECO/releases/download/1.0/"
ENV_HUB = "DECODET_HUB"
ENV_CACHE = "DECODET_CACHE"
_CHUNK = 1 << 20  # bytes per read
_TIMEOUT_S = 30.0  # per socket operation, not the whole download


@dataclass(frozen=True)
class NamedWeights:
    """One released checkpoint: its name here, the preset it loads as, its file, its COCO AP."""

    name: str
    preset: str
    filename: str
    coco_ap: float  # box AP on COCO val2017 published by the authors (percent)


WEIGHTS: dict[str, NamedWeights] = {
    w.name: w
    for w in (
        NamedWeights("deco_r50.coco", "deco_r50", "deco_r50_150e.pth", 38.8),
        NamedWeights("deco_convnext_tiny.coco", "deco_convnext_tiny", "deco_convnextTiny1K_150.pth", 40.8),
        NamedWeights("decoplus_r18.coco", "decoplus_r18", "decoplus_r18_150e.pth", 40.7),
        NamedWeights("decoplus_r50.coco", "decoplus_r50", "decoplus_r50_150e.pth", 47.9),
    )
}


# ----------------------------------------------------------------------------- places


def cache_dir() -> Path:
    """``$DECODET_CACHE`` or ``~/.cache/decodet``."""
    return Path(os.environ.get(ENV_CACHE) or "~/.cache/decodet").expanduser()


def cached_path(name: str) -> Path:
    """Where named weights ``name`` live (or will) in the cache."""
    return cache_dir() / "weights" / _entry(name).filename


def is_cached(name: str) -> bool:
    return cached_path(name).is_file()


def hub_url(name: str) -> str:
    """The download URL of named weights ``name`` (``$DECODET_HUB`` overrides the base)."""
    base = os.environ.get(ENV_HUB) or DEFAULT_HUB
    return base.rstrip("/") + "/" + _entry(name).filename


def _entry(name: str) -> NamedWeights:
    if name not in WEIGHTS:
        raise DecodetError(f"unknown named weights {name!r}; available: {', '.join(sorted(WEIGHTS))}")
    return WEIGHTS[name]


def _checksum_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


# ----------------------------------------------------------------------------- resolution


def resolve_weights(weights: str | os.PathLike) -> str | os.PathLike:
    """A local path for ``weights``: existing paths (winning over a name) pass through; names are fetched."""
    if not isinstance(weights, str) or Path(weights).exists():
        return weights
    if weights in WEIGHTS:
        return fetch(weights)
    if weights.endswith(".coco") and "/" not in weights and os.sep not in weights:
        raise DecodetError(f"no file and no named weights {weights!r}; named weights: {', '.join(sorted(WEIGHTS))}")
    return weights


def fetch(name: str, progress: bool | None = None) -> Path:
    """The cached file of named weights ``name``, downloaded first if missing.  ``progress``: ``None`` shows
    a bar when stderr is a terminal (log lines otherwise).  :class:`DecodetError` when the download fails or
    the cached file's SHA-256 differs from the one recorded at its first download."""
    path = cached_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock(path):  # concurrent processes (torchrun ranks) download once
        if not path.is_file():
            download(hub_url(name), path, progress=progress)
            _record_checksum(path, hub_url(name))
        else:
            verify_checksum(path)
    return path


def verify_checksum(path: Path) -> None:
    """Compare ``path``'s SHA-256 with the recorded one; record it if none is (a file placed by hand)."""
    record = _checksum_file(path)
    if not record.is_file():
        log.info("%s: no recorded checksum (placed by hand?): recording it now", path)
        _record_checksum(path, url=None)
        return
    try:
        want = json.loads(record.read_text(encoding="utf-8"))["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DecodetError(f"unreadable checksum record ({exc}); delete it to record a new one", record) from None
    got = sha256_of(path)
    if got != want:
        raise DecodetError(
            f"SHA-256 {got[:16]}... differs from {want[:16]}... recorded at download: the file changed or is "
            f"damaged; delete {path} and {record} to download it again",
            path,
        )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _record_checksum(path: Path, url: str | None) -> None:
    info = {"file": path.name, "size": path.stat().st_size, "sha256": sha256_of(path), "url": url}
    info["recorded"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_text(_checksum_file(path), json.dumps(info, indent=2) + "\n")


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    try:
        import fcntl  # POSIX; elsewhere concurrent first downloads are not serialised
    except ImportError:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- download


class _Interrupted(Exception):
    """The transfer stopped part-way; the ``.part`` file holds what arrived."""


def download(url: str, dest: Path, progress: bool | None = None, attempts: int = 3) -> Path:
    """Fetch ``url`` into ``dest`` via ``dest.part`` (resumed with HTTP Range), then rename.  Up to
    ``attempts`` tries resume where the last stopped; after that ``.part`` stays for the next call."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, dest)
    for attempt in range(1, attempts + 1):
        try:
            _transfer(url, dest, part, progress)
            break
        except _Interrupted as exc:
            have = part.stat().st_size if part.exists() else 0
            if attempt == attempts:
                raise DecodetError(
                    f"download interrupted ({exc}) with {have} bytes in {part}; run again to resume, or download "
                    f"{url} by hand and save it as {dest}"
                ) from None
            log.warning("download interrupted (%s): resuming from byte %d", exc, have)
            time.sleep(0.5 * attempt)
    with open(part, "rb") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    _fsync_dir(dest.parent)
    return dest


def _transfer(url: str, dest: Path, part: Path, progress: bool | None) -> None:
    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "decodet"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # the .part file does not fit the server's file: start over
            part.unlink()
            raise _Interrupted("the server cannot resume this partial file") from None
        raise _offline(url, dest, f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise _offline(url, dest, str(reason)) from None
    with response:
        if start and response.status == 206 and _range_start(response) == start:
            mode, total = "ab", _range_total(response)
        else:  # a plain 200: the server sent the whole file
            mode, start = "wb", 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        with (
            open(part, mode) as f,
            tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                disable=None if progress is None else not progress,
            ) as bar,
        ):
            try:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (http.client.HTTPException, OSError) as exc:
                raise _Interrupted(type(exc).__name__) from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Interrupted(f"{size} of {total} bytes")
    log.info("downloaded %s (%.1f MB)", dest.name, size / 1e6)


def _range_start(response: http.client.HTTPResponse) -> int | None:
    """First byte of a 206 answer (``Content-Range: bytes START-END/TOTAL``)."""
    value = response.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _range_total(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Range", "")
    total = value.rpartition("/")[2]
    return int(total) if total.isdigit() else None


def _offline(url: str, dest: Path, reason: str) -> DecodetError:
    return DecodetError(f"cannot download {url} ({reason}); download it by hand and save it as {dest}")


__all__ = [
    "WEIGHTS",
    "NamedWeights",
    "cache_dir",
    "cached_path",
    "download",
    "fetch",
    "hub_url",
    "is_cached",
    "resolve_weights",
    "sha256_of",
    "verify_checksum",
]
