"""``peft-persona`` command line: one sub-command per module in :mod:`peft_persona.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .commands.preflight import one_line

# Each module defines `register(subparsers)`, which adds its sub-command and sets `func` on the parser.
COMMANDS = ("extract", "eval", "tune", "compare", "push", "inspect", "merge", "data", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-persona", description="Extract, evaluate, share and inspect persona mask adapters."
    )
    parser.add_argument(
        "--debug", action="store_true", help="print the full traceback of an error (allowed after COMMAND too)"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"peft_persona.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(argv) if argv is not None else sys.argv[1:]
    debug = "--debug" in words
    args = build_parser().parse_args([w for w in words if w != "--debug"])
    args.argv = words  # the words, for reports that record the command
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, TypeError, OSError) as err:
        if debug:
            raise
        print(f"peft-persona {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
