"""Argument types shared by the sub-commands (argparse ``type=`` callables)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

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
        "with its LM head (the names of hiftune train), seq-cls a classification head "
        "(default causal-lm)",
    )
