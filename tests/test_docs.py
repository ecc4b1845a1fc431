"""The README and docs/*.md stay true to the repository: links and anchors resolve, paths and
module names they mention exist, every ``decodet`` command in the README's ```bash blocks
parses with today's CLI, the ``make`` targets exist, and the README stays a short manual."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PACKAGE = ROOT / "src" / "decodet"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 350

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")


# --- reading Markdown ------------------------------------------------------------------------


def split_markdown(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(prose lines, [(fence language, block lines)]): fenced code kept apart from the prose."""
    prose: list[str] = []
    blocks: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        m = FENCE.match(line)
        if m and current is None:
            current = []
            blocks.append((line.strip()[3:].strip().lower(), current))
        elif m:
            current = None
        elif current is not None:
            current.append(line)
        else:
            prose.append(line)
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link: its text
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file, duplicates numbered as GitHub does (-1, -2)."""
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in prose:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    text = "\n".join(prose)
    text = INLINE_CODE.sub("", text)  # `[x](y)` in code is not a link
    return LINK.findall(text)


def check_link(doc: Path, target: str) -> str | None:
    """None when ``target`` (as written in ``doc``) resolves, else why not."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
        return None
    path_part, _, anchor = target.partition("#")
    dest = (doc.parent / path_part).resolve() if path_part else doc
    if not dest.exists():
        return f"{target}: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} does not exist"
    if anchor:
        if dest.suffix.lower() != ".md":
            return f"{target}: an anchor into a file that is not Markdown"
        if anchor not in anchors(dest):
            return f"{target}: no heading with anchor #{anchor} in {dest.name}"
    return None


def test_slug_follows_github_rules():
    assert slug("Tests on other CPUs' kernels") == "tests-on-other-cpus-kernels"
    assert slug("OpenVINO int8 schemes (2026-11-30)") == "openvino-int8-schemes-2026-11-30"
    assert slug("`deco_r50` at 640x640") == "deco_r50-at-640x640"
    assert slug("How to add ...") == "how-to-add-"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_anchors_resolve(doc):
    found = links(doc)
    problems = [p for t in found if (p := check_link(doc, t))]
    assert not problems, f"{doc.name}: broken links:\n" + "\n".join(problems)


def test_link_checker_catches_breakage(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text("# Top\n\n## Some section\n\n[ok](#some-section) [ok](b.md#b-heading)\n", encoding="utf-8")
    (tmp_path / "b.md").write_text("# B heading\n", encoding="utf-8")
    assert [check_link(doc, t) for t in links(doc)] == [None, None]
    assert check_link(doc, "#missing") is not None
    assert check_link(doc, "b.md#missing") is not None
    assert check_link(doc, "c.md") is not None


# --- paths and module names ------------------------------------------------------------------

PY_FILE = re.compile(r"^[\w./-]+\.py$")
MODULE_ATTR = re.compile(r"^([a-z_]+(?:/[a-z_]+)+)\.([A-Za-z_]\w*)$")  # inference/graph.DeployModel
DOTTED = re.compile(r"^decodet(?:\.[A-Za-z_]\w*)+")  # decodet.runtime.pt2e.quantize_pt2e(...)
PACKAGES = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}


def module_file(parts: list[str]) -> Path | None:
    base = PACKAGE.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def defines(path: Path, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", path.read_text(encoding="utf-8")) is not None


def check_code_reference(token: str) -> str | None:
    """None when a path or module name written in inline code exists in the repository."""
    if PY_FILE.match(token):
        roots = (ROOT, PACKAGE, ROOT / "tests", ROOT / "benchmarks")
        return None if any((r / token).is_file() for r in roots) else f"`{token}`: no such file"
    m = MODULE_ATTR.match(token)
    if m and m.group(1).split("/")[0] in PACKAGES:
        path = module_file(m.group(1).split("/"))
        if path is None:
            return f"`{token}`: no module src/decodet/{m.group(1)}.py"
        return None if defines(path, m.group(2)) else f"`{token}`: {m.group(2)} not in {path.relative_to(ROOT)}"
    m = DOTTED.match(token)
    if m:
        parts = m.group(0).split(".")[1:]
        for n in range(len(parts), -1, -1):  # the longest prefix that is a module
            path = module_file(parts[:n]) if n else PACKAGE / "__init__.py"
            if path is not None:
                break
        rest = parts[n:]
        if len(rest) > 1:
            return f"`{token}`: no module decodet.{'.'.join(parts[: n + 1])}"
        if rest and not defines(path, rest[0]):
            return f"`{token}`: {rest[0]} not in {path.relative_to(ROOT)}"
    return None


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_and_modules_mentioned_exist(doc):
    prose, _ = split_markdown(doc.read_text(encoding="utf-8"))
    tokens = {t.strip() for line in prose for t in INLINE_CODE.findall(line)}
    problems = sorted(p for t in tokens if (p := check_code_reference(t)))
    assert not problems, f"{doc.name} names what does not exist:\n" + "\n".join(problems)


def test_reference_checker_catches_stale_names():
    assert check_code_reference("export/quantize.py") is None
    assert check_code_reference("inference/graph.DeployModel") is None
    assert check_code_reference("decodet.runtime.pt2e.quantize_pt2e") is None
    assert check_code_reference("decodet.Detector") is None
    assert check_code_reference("deploy/quantize.py") is not None
    assert check_code_reference("runtime/detector.NoSuchThing") is not None
    assert check_code_reference("decodet.deploy.web.ORT_WEB_VERSION") is not None
    assert check_code_reference("runs/demo/best.safetensors") is None  # not a module: not checked


# --- commands --------------------------------------------------------------------------------


def readme_blocks() -> list[tuple[str, list[str]]]:
    return split_markdown(README.read_text(encoding="utf-8"))[1]


def shell_lines(block: list[str]) -> list[list[str]]:
    """A bash block's commands as token lists: continuations joined, comments dropped."""
    joined: list[str] = []
    pending = ""
    for line in block:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    return [tokens for line in joined if (tokens := shlex.split(line, comments=True))]


def decodet_argv(tokens: list[str]) -> list[str] | None:
    """The arguments after ``decodet`` (also ``python -m decodet``, ``torchrun ... -m decodet``)."""
    i = 0
    while i < len(tokens) and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[i]):  # VAR=value prefixes
        i += 1
    if i < len(tokens) and tokens[i] == "decodet":
        return tokens[i + 1 :]
    for j in range(i, len(tokens) - 1):
        if tokens[j] == "-m" and tokens[j + 1] == "decodet":
            return tokens[j + 2 :]
    return None


def readme_commands() -> list[list[str]]:
    return [
        argv
        for lang, block in readme_blocks()
        if lang in ("bash", "sh", "shell", "console")
        for tokens in shell_lines(block)
        if (argv := decodet_argv(tokens)) is not None
    ]


@pytest.fixture(scope="module")
def parsers():
    from decodet.cli import build_parser
    from decodet.engine.train_config import build_arg_parser

    main_parser, train_parser = build_parser(), build_arg_parser()
    for parser in (*all_parsers(main_parser), train_parser):
        parser.allow_abbrev = False  # the README spells flags in full: a renamed flag's prefix must not pass
    return main_parser, train_parser


def all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                out += all_parsers(sub)
    return out


def subcommand_words(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The subcommand path at the start of ``argv`` (``["data", "check"]``), walking the parser."""
    words: list[str] = []
    for token in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or token not in subs[0].choices:
            break
        words.append(token)
        parser = subs[0].choices[token]
    return words


def parse(parsers, argv: list[str]) -> str | None:
    """None when ``argv`` parses as ``decodet`` would parse it, else argparse's message."""
    main_parser, train_parser = parsers
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if argv[:1] == ["train"]:
                main_parser.parse_args(argv[:1])
                train_parser.parse_args(argv[1:])
            else:
                main_parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code:
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exc.code}"
    return None


def test_readme_has_its_commands():
    commands = readme_commands()
    assert len(commands) >= 15
    firsts = {tuple(c[:2]) if c[:1] == ["data"] else c[0] for c in commands}
    assert {"train", "eval", "predict", "export", "serve", "benchmark", ("data", "check")} <= firsts


def test_cli_examples_are_in_bash_blocks():
    """A ``decodet`` or ``make`` line in a fence of another language would escape the checks below."""
    stray = [
        line
        for lang, block in readme_blocks()
        if lang not in ("bash", "sh", "shell", "console")
        for line in block
        if re.match(r"^\s*(decodet|torchrun|python -m decodet|make)\s", line)
    ]
    assert not stray, f"commands outside ```bash blocks: {stray}"


def test_readme_subcommands_have_help(parsers):
    """``decodet <subcommand> --help`` exits 0 for every subcommand the README uses."""
    main_parser, train_parser = parsers
    seen = {tuple(subcommand_words(main_parser, argv)) for argv in readme_commands()}
    for words in sorted(seen):
        assert words, "a README command names no subcommand"
        out = io.StringIO()
        with pytest.raises(SystemExit) as exc, contextlib.redirect_stdout(out):
            if words == ("train",):
                train_parser.parse_args(["--help"])
            else:
                main_parser.parse_args([*words, "--help"])
        assert exc.value.code == 0 and "usage: decodet" in out.getvalue(), words


def test_readme_commands_parse(parsers):
    """Every flag and argument of every README command is one that ``decodet`` accepts."""
    problems = [f"decodet {shlex.join(argv)}: {why}" for argv in readme_commands() if (why := parse(parsers, argv))]
    assert not problems, "README commands the CLI refuses:\n" + "\n".join(problems)


def test_command_check_catches_breakage(parsers):
    assert parse(parsers, ["eval", "--weights", "w", "--data", "d"]) is None
    assert parse(parsers, ["train", "--model", "deco_tiny", "--epochs", "3"]) is None
    assert parse(parsers, ["eval", "--weights", "w", "--data", "d", "--no-such-flag"]) is not None
    assert parse(parsers, ["train", "--no-such-flag"]) is not None
    assert parse(parsers, ["no-such-command"]) is not None
    assert parse(parsers, ["serve", "--weights", "w", "--max-wait", "5"]) is not None  # a prefix of --max-wait-ms
    assert decodet_argv(shlex.split("TORCH_X=1 torchrun --nnodes 2 -m decodet train --model m")) == [
        "train",
        "--model",
        "m",
    ]


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, flags=re.M))


def test_readme_make_targets_exist():
    prose, blocks = split_markdown(README.read_text(encoding="utf-8"))
    named = {m for line in prose for code in INLINE_CODE.findall(line) for m in re.findall(r"^make ([\w-]+)", code)}
    for lang, block in blocks:
        if lang in ("bash", "sh", "shell", "console"):
            named |= {tokens[1] for tokens in shell_lines(block) if tokens[0] == "make" and len(tokens) > 1}
    assert {"demo", "test", "test-kernels"} <= named
    missing = named - make_targets()
    assert not missing, f"README names make targets the Makefile lacks: {sorted(missing)}"


# --- size ------------------------------------------------------------------------------------


def test_readme_stays_a_short_manual():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < MAX_README_LINES, f"README.md has {lines} lines; measurements go to docs/benchmarks.md"
