"""Argument types shared by the sub-commands (argparse ``type=`` callables)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence


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
