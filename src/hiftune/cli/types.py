"""Argument types shared by the sub-commands (argparse ``type=`` callables)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

from ..engine.config import GROUP_BY, HiFTConfig
from ..errors import UserError
from ..memory.configs import CONFIGS, TASK_HEADS


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def units_per_group(text: str) -> int | str:
    """``hiftune train --units-per-group``: an integer >= 1, or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or auto, got {text!r}") from None


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def unit_budget(text: str) -> int | str | None:
    """``--max-unit-params``: ``auto``, ``none`` (off) or a positive integer (``30e6`` works)."""
    lowered = text.strip().lower()
    if lowered in ("auto", "none"):
        return None if lowered == "none" else "auto"
    try:
        value = float(lowered)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be auto, none or a number of parameters, got {text!r}"
        ) from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(value)


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """How the model is split into units and groups (beyond m): the unit budget and balancing."""
    parser.add_argument(
        "--max-unit-params",
        type=unit_budget,
        default="auto",
        help="size budget of a unit in parameters: larger units are split (a block into its "
        "modules, a vocabulary matrix into row shards). auto = the largest block (default); "
        "none = never split (the paper's units)",
    )
    parser.add_argument(
        "--group-by",
        choices=GROUP_BY,
        default="count",
        help="count: m units per group (default); size: the same number of groups, balanced by "
        "parameters",
    )


def split_config(args: argparse.Namespace) -> HiFTConfig:
    """The :class:`HiFTConfig` of :func:`add_split_arguments`' options (and m, if given).

    Raises:
        UserError: For a value the engine refuses (e.g. m = 0), as one line.
    """
    try:
        return HiFTConfig(
            units_per_group=getattr(args, "units_per_group", 1),
            max_unit_params=args.max_unit_params,
            group_by=args.group_by,
        )
    except ValueError as e:
        raise UserError(str(e)) from None


def comma_list(choices: Sequence[str] | None = None) -> Callable[[str], list[str]]:
    """A comma-separated list, each item one of ``choices`` (any item if ``None``)."""

    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        for s in items:
            if choices is not None and s not in choices:
                raise argparse.ArgumentTypeError(
                    f"invalid choice {s!r} (choose from {', '.join(choices)})"
                )
        return items

    return parse


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model of the memory tools (``estimate``, ``inspect``): a preset or a config, and a task."""
    parser.add_argument(
        "model",
        metavar="MODEL",
        help=f"a preset ({', '.join(CONFIGS)}) or a Hugging Face config.json (file or directory)",
    )
    parser.add_argument(
        "--task",
        choices=tuple(TASK_HEADS),
        default="causal-lm",
        help="what the model is trained for: causal-lm, prompt-cls and sft build a causal LM "
        "with its LM head (the names of hiftune train), seq-cls a classification head; "
        "seq2seq-lm (T5, BART), speech-seq2seq (Whisper), image-cls (ViT), ctc (wav2vec2) and "
        "image-text-to-text (LLaVA) the transformers auto class of that head (default causal-lm)",
    )
