"""The ``hiftune`` command line: one sub-command per verb, one module per sub-command.

Each sub-command module (``hiftune.cli.train``, ``.estimate``, ``.profile``) exposes
``add_arguments(parser)`` and ``run(args) -> int``: argument parsing and a call into the library,
nothing else. A module is imported only when its sub-command is chosen, so ``hiftune estimate``
never pays for the training stack's imports. Nothing in the library imports this package.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from ..errors import UserError, first_line

#: sub-command -> one-line help; the module is ``hiftune.cli.<sub-command>``.
COMMANDS: dict[str, str] = {
    "train": "fine-tune a model with HiFT (or plain FPFT) end to end",
    "estimate": "predict training memory without loading weights",
    "profile": "measure memory and step time of FPFT vs HiFT",
    "inspect": "show the unit split, groups and warnings before training",
}


def _module(command: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{command}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="hiftune", description="Hierarchical full-parameter fine-tuning (HiFT)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            _module(name).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hiftune`` console script and ``python -m hiftune``.

    A :class:`~hiftune.errors.UserError` is printed as one line and exits with code 2.
    """
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
    try:
        return int(_module(args.command).run(args) or 0)
    except UserError as e:
        print(f"hiftune {args.command}: error: {first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hiftune {args.command}: interrupted", file=sys.stderr)
        return 130
