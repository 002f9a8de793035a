"""Argument types shared by the sub-commands."""

from __future__ import annotations

import argparse

import pytest

from hiftune.cli.types import positive_float, unit_budget, units_per_group


@pytest.mark.parametrize(
    ("text", "expected"),
    [("auto", "auto"), ("AUTO", "auto"), ("none", None), ("1000", 1000), ("30e6", 30_000_000)],
)
def test_unit_budget_parses(text: str, expected: object) -> None:
    assert unit_budget(text) == expected


@pytest.mark.parametrize("text", ["0", "-5", "1.5", "big", ""])
def test_unit_budget_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        unit_budget(text)


def test_units_per_group_and_positive_float() -> None:
    assert units_per_group("auto") == "auto" and units_per_group(" Auto") == "auto"
    assert units_per_group("3") == 3
    for bad in ("0", "2.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="integer >= 1 or auto"):
            units_per_group(bad)
    assert positive_float("3") == 3.0 and positive_float("0.5") == 0.5
    for bad in ("0", "-1", "inf", "nan", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_float(bad)
