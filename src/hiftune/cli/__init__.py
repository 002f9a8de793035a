"""The ``hiftune`` command line: one sub-command per verb, one module per sub-command.

Each sub-command module (``hiftune.cli.train``, ``.estimate``, ``.profile``) exposes
``add_arguments(parser)`` and ``run(args) -> int``: argument parsing and a call into the library,
nothing else. A module is imported only when its sub-command is chosen, so ``hiftune estimate``
never pays for the training stack's imports. A module may also have options that are expensive
to define (``hiftune train``'s transformers ``TrainingArguments``): it then exposes
``add_extra_arguments(parser)`` and ``is_extra_option(arg) -> bool``, and :func:`parse_args`
adds them only to parse a command line that may hold one, so that ``--help``, ``--version`` and
a mistyped option answer at once. Nothing in the library imports this package.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from .. import __version__
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


def build_parser(command: str | None = None, extra: bool = False) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported to add its arguments.

    Args:
        command: The sub-command whose arguments to add (``None``: none).
        extra: Also add its expensive options (``add_extra_arguments``), and accept
            abbreviated options as argparse does; without them an abbreviation is left to
            :func:`parse_args`, since it may abbreviate one of those options.
    """
    parser = argparse.ArgumentParser(
        prog="hiftune", description="Hierarchical full-parameter fine-tuning (HiFT)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"hiftune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = _module(name) if name == command else None
        deferred = module is not None and hasattr(module, "add_extra_arguments") and not extra
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=not deferred)
        if module is not None:
            module.add_arguments(p)
            if extra and hasattr(module, "add_extra_arguments"):
                module.add_extra_arguments(p)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parses a command line, adding a sub-command's expensive options only if it may use one.

    Exits (as argparse does) with code 2 for a bad command line and 0 after ``--help``.
    """
    argv = list(argv)
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(command)
    if command is None or not hasattr(module := _module(command), "add_extra_arguments"):
        return parser.parse_args(argv)
    args, rest = parser.parse_known_args(argv)
    if not rest:
        return args
    own = _option_strings(parser, command)
    unknown = [
        a
        for a in rest
        if a.startswith("-")
        and not module.is_extra_option(a)
        and not any(o.startswith(a.split("=", 1)[0]) for o in own)
    ]
    if unknown:
        close = difflib.get_close_matches(unknown[0].split("=", 1)[0], own, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return build_parser(command, extra=True).parse_args(argv)


def _option_strings(parser: argparse.ArgumentParser, command: str) -> list[str]:
    """The long option strings of ``command``'s sub-parser."""
    # argparse has no public way to reach a sub-parser or its options; these private names are
    # the ones its own help formatting reads.
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [
        o for a in sub.choices[command]._actions for o in a.option_strings if o.startswith("--")
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hiftune`` console script and ``python -m hiftune``.

    A :class:`~hiftune.errors.UserError` is printed as one line and exits with code 2.
    """
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        build_parser().print_help()
        return 2
    try:
        return int(_module(args.command).run(args) or 0)
    except UserError as e:
        print(f"hiftune {args.command}: error: {first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hiftune {args.command}: interrupted", file=sys.stderr)
        return 130
