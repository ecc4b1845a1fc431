"""The repository reads nothing outside the clone: no absolute paths of one machine in the code
or the tests (``../shared`` is reached relative to the clone, and skipped without it)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A quoted absolute path of two or more components (a home folder, a mount point, ...).
QUOTED_ABSOLUTE = re.compile(r"""["'](/[A-Za-z0-9_.-]+){2,}/?["']""")
# Where one machine's files live (a URL route such as "/v1/detect" is no file path).
MACHINE_ROOTS = ("/work/", "/home/", "/root/", "/mnt/", "/media/", "/data/", "/opt/", "/srv/", "/scratch/", "/Users/")


def test_no_machine_specific_absolute_paths() -> None:
    found = []
    for folder in ("src", "tests", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == Path(__file__).resolve():
                continue  # this file's own examples
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                for m in QUOTED_ABSOLUTE.finditer(line):
                    if m.group(0)[1:].startswith(MACHINE_ROOTS):
                        found.append(f"{path.relative_to(REPO)}:{n}: {m.group(0)}")
    assert not found, "absolute paths that a user's clone does not have:\n" + "\n".join(found)


def test_the_detector_of_absolute_paths_works() -> None:
    assert QUOTED_ABSOLUTE.search('TABLES = Path("/work/shared/reference")')
    assert not QUOTED_ABSOLUTE.search('Path("relative/path")')
    assert not QUOTED_ABSOLUTE.search('"/v1/detect"')[0][1:].startswith(MACHINE_ROOTS)
