"""The repository reads nothing outside the clone: no absolute paths of one machine in the code
or the tests (``../shared`` is reached relative to the clone, and skipped without it)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A quoted absolute path of two or more components (a home folder, a mount point, ...).
QUOTED_ABSOLUTE = re.compile(r"""["'](/[A-Za-z0-9_.-]+){2,}/?["']""")
# System locations a program may name on any machine.
ALLOWED = ("/proc/", "/dev/", "/sys/", "/usr/", "/etc/", "/tmp/")


def test_no_machine_specific_absolute_paths() -> None:
    found = []
    for folder in ("src", "tests", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == Path(__file__).resolve():
                continue  # this file's own examples
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                for m in QUOTED_ABSOLUTE.finditer(line):
                    if not m.group(0)[1:].startswith(ALLOWED):
                        found.append(f"{path.relative_to(REPO)}:{n}: {m.group(0)}")
    assert not found, "absolute paths that a user's clone does not have:\n" + "\n".join(found)


def test_the_detector_of_absolute_paths_works() -> None:
    assert QUOTED_ABSOLUTE.search('TABLES = Path("/work/shared/reference")')
    assert not QUOTED_ABSOLUTE.search('Path("relative/path")')
