"""The package's import rules (docs/architecture.md, "Import layers") hold for every import in
``src/decodet``, at module level and inside functions, and its size limits hold too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOC = ROOT / "docs" / "architecture.md"


def read_layers(text: str) -> dict[str, int]:
    """``{package: layer}`` from the doc's import-layer table (rows ``| n | `pkg`, `pkg` | ... |``)."""
    start = text.index("<!-- import-layers")
    layers: dict[str, int] = {}
    for line in text[start:].splitlines()[1:]:
        if not line.startswith("|"):
            if layers:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not cells[0].isdigit():
            continue
        for name in re.findall(r"`([\w.]+)`", cells[1]):
            layers[name] = int(cells[0])
    return layers


LAYERS = read_layers(DOC.read_text())


def unit_of(module: str) -> str | None:
    """The longest package of the table that ``module`` is or lies in."""
    best = None
    for name in LAYERS:
        if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best)):
            best = name
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every decodet import in ``path`` (relative ones resolved;
    ``from pkg import name`` counts as ``pkg.name`` when that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                is_module = (SRC / sub.replace(".", "/")).with_suffix(".py").exists() or (
                    SRC / sub.replace(".", "/")
                ).is_dir()
                found.append((node.lineno, sub if is_module else base))
    return [(line, m) for line, m in found if m == "decodet" or m.startswith("decodet.")]


def violations() -> list[str]:
    bad = []
    for path in sorted((SRC / "decodet").rglob("*.py")):
        me = module_name(path)
        mine = unit_of(me)
        if mine is None:
            bad.append(f"{path.relative_to(ROOT)}: package {me} is not in the import-layer table")
            continue
        for line, target in imports_of(path):
            theirs = unit_of(target)
            if theirs is None or theirs == mine:
                continue
            if LAYERS[theirs] >= LAYERS[mine]:
                bad.append(
                    f"{path.relative_to(ROOT)}:{line}: {mine} (layer {LAYERS[mine]}) imports {target} "
                    f"({theirs}, layer {LAYERS[theirs]})"
                )
    return bad


def test_the_layer_table_is_read_from_the_doc():
    assert LAYERS["decodet.errors"] == 0
    assert LAYERS["decodet.engine"] > LAYERS["decodet.evaluation"] > LAYERS["decodet.runtime"]
    assert len(set(LAYERS.values())) >= 8


def test_no_module_imports_up_or_across_a_layer():
    bad = violations()
    assert not bad, "imports that break docs/architecture.md's layers:\n" + "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The walk sees imports inside functions and relative ones (a check that never fails
    would pass the test above on any code)."""
    pkg = tmp_path / "decodet" / "models"
    pkg.mkdir(parents=True)
    (tmp_path / "decodet" / "engine").mkdir()
    (tmp_path / "decodet" / "engine" / "trainer.py").write_text("")
    bad = pkg / "bad.py"
    bad.write_text("def f():\n    from ..engine import trainer\n    import decodet.runtime\n")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path)
    found = imports_of(bad)
    assert ("decodet.engine.trainer" in [m for _, m in found]) and ("decodet.runtime" in [m for _, m in found])


LIMITS = {"file_lines": 500, "function_lines": 80, "package_share": 0.20}


def _source_files() -> list[Path]:
    return sorted((SRC / "decodet").rglob("*.py"))


def test_no_file_over_the_line_limit():
    long = [f"{p.relative_to(ROOT)}: {n}" for p in _source_files() if (n := len(p.read_text().splitlines())) > 500]
    assert not long, "files over 500 lines:\n" + "\n".join(long)


def test_no_function_over_the_line_limit():
    long = []
    for path in _source_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > LIMITS["function_lines"]:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


def test_no_package_holds_over_a_fifth_of_the_code():
    sizes: dict[str, int] = {}
    for path in _source_files():
        rel = path.relative_to(SRC / "decodet").parts
        key = rel[0] if len(rel) > 1 else "(top level)"
        sizes[key] = sizes.get(key, 0) + len(path.read_text().splitlines())
    total = sum(sizes.values())
    big = {k: f"{v / total:.0%}" for k, v in sizes.items() if v / total > LIMITS["package_share"]}
    assert not big, f"packages over 20% of src/ ({total} lines): {big}"


@pytest.mark.parametrize("name", ["Detector", "export_onnx", "to_supervision", "from_supervision"])
def test_old_deploy_names_still_work_with_a_warning(name):
    import decodet.deploy

    with pytest.warns(DeprecationWarning, match=f"decodet.deploy.{name} moved"):
        value = getattr(decodet.deploy, name)
    assert callable(value)
