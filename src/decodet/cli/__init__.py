"""The ``decodet`` command line: one program, one subcommand per job (``decodet --help`` lists them:
models, data, train, eval, predict, export, benchmark, convert, demo, serve).

User mistakes (:class:`DecodetError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from decodet.errors import DecodetError

log = logging.getLogger("decodet")


# Each module registers its subcommands (``register(subparsers)``): a new command group is a
# new module here plus one entry in this list.
COMMAND_MODULES = ["core", "data", "serve"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="decodet", description="DECO: query-based detection with ConvNets.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(f"decodet.cli.{module}").register(sub)
    return p


def _one_line(message: str) -> str:
    """The user-facing line of an error message (a worker's traceback ends with ours)."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith("decodet.errors.DecodetError:"):
            return line.split(":", 1)[1].strip()
    return lines[-1] if lines else message


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # `train` owns its flags (they mirror TrainConfig); everything after it passes through.
    if "train" in argv[:2]:
        i = argv.index("train")
        args, rest = parser.parse_args(argv[: i + 1]), argv[i + 1 :]
    else:
        args, rest = parser.parse_args(argv), []
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if getattr(args, "passthrough", False):
            return args.func(args, rest)
        return args.func(args)
    except DecodetError as exc:
        print(f"decodet: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:  # an error re-raised from a DataLoader worker wraps our message
        if isinstance(exc, DecodetError) or "DecodetError" not in str(exc):
            raise
        print(f"decodet: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("decodet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
