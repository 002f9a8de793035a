"""``hiftune train``'s pass-through options: every ``transformers.TrainingArguments`` field.

Importing ``transformers.TrainingArguments`` takes seconds (torch, accelerate, ...), so the
command line does without it until an option needs it: ``hiftune train --help`` describes these
options in one paragraph, ``--help-training-args`` lists them, and :func:`hiftune.cli.parse_args`
parses a command line again with them (:func:`add_training_arguments`) only when it holds an
option that is not hiftune's own and :func:`could_be_training_option` says may be one. That check
reads the field names from the installed ``transformers``' source instead of importing it, so a
mistyped option is refused at once.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..recipes.arguments import ALIASES, CONTROLLED, HIFT_CONFLICTS, RENAMED
from ..recipes.config import config_keys

GROUP = "transformers TrainingArguments"
#: How ``hiftune train --help`` describes the pass-through options without importing them.
DESCRIPTION = (
    "any other TrainingArguments option as --name VALUE (booleans: --flag, --flag false, "
    "--no-flag), e.g. --gradient-checkpointing or --report-to tensorboard, passed to the "
    "Trainer; --help-training-args lists them. hiftune's defaults: log every step, report_to "
    "none, eval_strategy no, its own progress bar"
)
#: hiftune's help for an option whose transformers help says something else (here: that the
#: name is deprecated, where hiftune keeps it as the one name every transformers version takes).
HELP = {
    "gradient_checkpointing": "recompute each block's activations in the backward pass: less "
    "activation memory, roughly 20%% slower steps (transformers' activation_checkpointing, which "
    "hiftune sets under this name where transformers has it)",
    "gradient_checkpointing_kwargs": "keyword arguments of the checkpointing, e.g. "
    "'{\"use_reentrant\": false}' (transformers' activation_checkpointing_kwargs)",
}


class _ListAction(argparse.Action):
    """``--help-training-args``: prints the pass-through options and exits (imports them)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        full = argparse.ArgumentParser(
            prog=parser.prog,
            usage=f"{parser.prog} [hiftune's options] [--name VALUE ...]",
            add_help=False,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        add_training_arguments(full, described=True)
        full.print_help()
        parser.exit()


def describe_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The pass-through options in ``--help``: one paragraph and ``--help-training-args``."""
    g = parser.add_argument_group(GROUP, DESCRIPTION)
    g.add_argument(
        "--help-training-args",
        action=_ListAction,
        help="list every TrainingArguments option hiftune train passes through, and exit",
    )


def add_training_arguments(parser: argparse.ArgumentParser, described: bool = False) -> None:
    """Adds every ``TrainingArguments`` field hiftune has no option of its own for.

    The options are ``HfArgumentParser``'s (``--name`` and ``--name-with-dashes``, booleans as
    ``--flag`` / ``--flag false`` / ``--no-flag``), copied with no default so that only what is
    typed reaches the configuration. hiftune's own options win: a field it has under the same
    name (``--seed``) is not added twice, and one it has under another name (``--lr``) is also
    reachable as ``--learning-rate`` (giving both with different values is an error). Options the
    recipe refuses (:data:`~hiftune.recipes.arguments.CONTROLLED`) are parsed, so that the
    refusal says why, but not listed; neither are the ``TrainingArguments`` names of hiftune's
    options nor the newer names of :data:`~hiftune.recipes.arguments.RENAMED`.

    Args:
        parser: ``hiftune train``'s parser.
        described: Give the group the description of ``--help`` (for the listing on its own).
    """
    from transformers import HfArgumentParser, TrainingArguments

    own = config_keys()
    hidden = {*CONTROLLED, *ALIASES.values(), *RENAMED.values()}
    g = parser.add_argument_group(GROUP, DESCRIPTION if described else None)
    # (transformers types its argument as a NewType over Any, which no class matches)
    hf = HfArgumentParser(TrainingArguments, add_help=False)  # type: ignore[arg-type]
    # argparse keeps no public list of a parser's actions; ``_actions`` is what its own
    # ``parents=`` mechanism copies.
    for action in hf._actions:
        if action.dest in own or isinstance(action, argparse._HelpAction):
            continue
        help_text = HELP.get(action.dest) or _first_sentence(action.help)
        if action.dest in HIFT_CONFLICTS:
            help_text += " (--method fpft only)"
        kwargs: dict[str, Any] = {
            "dest": action.dest,
            "default": argparse.SUPPRESS,
            "help": argparse.SUPPRESS if action.dest in hidden else help_text,
        }
        if isinstance(action, argparse._StoreFalseAction):
            kwargs["action"] = "store_false"
        else:
            kwargs.update(
                nargs=action.nargs, const=action.const, type=action.type, choices=action.choices
            )
            if action.metavar is not None:
                kwargs["metavar"] = action.metavar
        with contextlib.suppress(argparse.ArgumentError):  # an option string hiftune has
            g.add_argument(*action.option_strings, **kwargs)


def _first_sentence(text: str | None) -> str:
    """The first sentence of a help text, safe for argparse's %-formatting."""
    first = (text or "").strip().split(". ")[0].rstrip(".")
    return first.replace("%", "%%")


def could_be_training_option(arg: str) -> bool:
    """Whether ``arg`` (``--name``, ``--name=value``, ``--no-name``) may be a pass-through option.

    An abbreviation counts, as argparse accepts one. ``True`` when the field names cannot be read
    from the source (then the full parser decides). The source is read even where
    ``transformers`` is imported already, so that the answer, and the hint for a typo, do not
    depend on what the process imported before.
    """
    if not arg.startswith("-") or _is_number(arg):
        return False  # a value, not an option
    names = _option_strings()
    if names is None:
        return True
    typed = arg.split("=", 1)[0]
    return any(name.startswith(typed) for name in names)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@functools.cache
def _option_strings() -> frozenset[str] | None:
    """Every option string ``HfArgumentParser`` makes of ``TrainingArguments``, from its source.

    ``None`` if the source cannot be read or does not have the class in the expected form.
    """
    spec = importlib.util.find_spec("transformers")  # finds the package without importing it
    if spec is None or spec.origin is None:
        return None
    try:
        tree = ast.parse((Path(spec.origin).parent / "training_args.py").read_text("utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    cls = next(
        (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainingArguments"),
        None,
    )
    if cls is None:
        return None
    fields = [
        n.target.id
        for n in cls.body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    ]
    if len(fields) < 50:  # not the dataclass this reading expects: let transformers decide
        return None
    out = set()
    for name in fields:
        for spelling in {name, name.replace("_", "-")}:
            out |= {f"--{spelling}", f"--no_{spelling}", f"--no-{spelling}"}
    # Aliases given in a field's metadata (``"aliases": ["--x"]``) are string constants.
    out |= {
        n.value
        for n in ast.walk(cls)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith("-")
    }
    return frozenset(out)
