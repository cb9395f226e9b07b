"""The ``stalwart`` command.

Thin by design: argument parsing and presentation here, the work in the packages.
Each command is one module of this package exposing ``register(subparsers)`` (which
adds its parser and sets ``func``) and an ``ORDER`` for ``--help``; adding a
command is adding a module. Shared presentation lives in :mod:`.output`.

User errors print one line (``stalwart: error: ...``) and exit with status 2;
``verify`` and ``diff`` exit 1 when they find a problem or a difference.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from stalwart import __version__
from stalwart.cli.output import EXIT_FOUND, EXIT_OK, EXIT_USAGE
from stalwart.errors import StalwartError

NOT_COMMANDS = {"output", "__main__"}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit status 2, like every other user error."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        print(f"stalwart: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def command_modules() -> list:
    """Every command module of this package, in ``--help`` order."""
    mods = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name in NOT_COMMANDS:
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(mod, "register"):
            mods.append(mod)
    return sorted(mods, key=lambda m: (getattr(m, "ORDER", 100), m.__name__))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="stalwart",
        description="Inspect, verify, diff and convert checkpoints; keep PyTorch training alive and cheap to restart.",
        epilog="Run 'stalwart COMMAND --help' for a command's options. Exit status: 0 ok, 1 problems found, 2 usage or input error.",
    )
    parser.add_argument("--version", action="version", version=f"stalwart {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for mod in command_modules():
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stalwart`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except (StalwartError, OSError, ValueError) as e:
        print(f"stalwart: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("stalwart: interrupted", file=sys.stderr)
        return 130


__all__ = ["EXIT_FOUND", "EXIT_OK", "EXIT_USAGE", "Parser", "build_parser", "command_modules", "main"]
