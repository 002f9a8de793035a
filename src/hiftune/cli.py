"""The ``hiftune`` command line: one sub-command per verb.

Each sub-command lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; it is imported only when chosen, so ``hiftune estimate`` never pays for the
training stack's imports.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

#: sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("hiftune.recipes.train", "fine-tune a model with HiFT (or plain FPFT) end to end"),
    "estimate": ("hiftune.memory.estimate", "predict training memory without loading weights"),
    "profile": ("hiftune.memory.profile", "measure memory and step time of FPFT vs HiFT"),
}


class CLIError(Exception):
    """A user error: printed as one line, exit code 2, no traceback."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if the message is empty)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="hiftune", description="Hierarchical full-parameter fine-tuning (HiFT)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hiftune`` console script and ``python -m hiftune``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except CLIError as e:
        print(f"hiftune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hiftune {args.command}: interrupted", file=sys.stderr)
        return 130
