"""Headless Chromium for the browser tests (Debian's ``chromium`` driven by Playwright for Python).

Tests skip with the reason when Playwright or Chromium is missing; ``.ci/run`` installs Chromium.
Screenshots go to ``tests/artifacts/`` (or ``$DECODET_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

ARTIFACTS = Path(os.environ.get("DECODET_TEST_ARTIFACTS", Path(__file__).resolve().parent / "artifacts"))
# Root in a sandbox, no GPU, and a closed network: no background connections of Chromium's own.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str:
    """The Chromium executable (``$DECODET_CHROMIUM`` or on PATH); skips the test without one."""
    path = os.environ.get("DECODET_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path or not Path(path).exists():
        pytest.skip("Chromium not found (apt-get install chromium, or set DECODET_CHROMIUM)")
    return path


@contextlib.contextmanager
def chromium_context(profile: Path, **options) -> Iterator:
    """A Playwright browser context on a fresh profile folder."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    executable = chromium_path()
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=executable, headless=True, args=CHROMIUM_ARGS, **options
        )
        try:
            yield context
        finally:
            context.close()


def artifact(name: str) -> Path:
    """Where a test saves a screenshot called ``name``."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name
