"""``hiftune train``'s TrainingArguments options: their listing and the check without transformers."""

from __future__ import annotations

import argparse

import pytest

from hiftune.cli import main
from hiftune.cli.training_args import _option_strings, could_be_training_option


def test_the_source_reading_knows_every_option_transformers_makes() -> None:
    from transformers import HfArgumentParser, TrainingArguments

    real = {
        o
        for a in HfArgumentParser(TrainingArguments)._actions  # type: ignore[arg-type]
        for o in a.option_strings
        if not isinstance(a, argparse._HelpAction)
    }
    names = _option_strings()
    assert names is not None
    missing = real - names
    assert not missing, f"options the fast check would refuse: {sorted(missing)[:5]}"


def test_could_be_training_option(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    # As on a command line that has not imported transformers yet.
    monkeypatch.delitem(sys.modules, "transformers.training_args", raising=False)
    assert could_be_training_option("--report-to")
    assert could_be_training_option("--report_to=none")
    assert could_be_training_option("--no-dataloader-pin-memory")
    assert could_be_training_option("--gradient-check")  # an abbreviation argparse takes
    assert not could_be_training_option("--no-such-option")
    assert not could_be_training_option("-1")  # a value


def test_the_listing_hides_refused_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--help-training-args"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--report-to" in text and "--eval-strategy" in text
    # Refused (CONTROLLED), hiftune's own under another name, the newer name of a kept one.
    for hidden in ("--optim ", "--logging-steps", "--learning-rate", "--activation-checkpointing"):
        assert hidden not in text, hidden
    assert "Deprecated alias" not in text
    assert "--gradient-checkpointing [GRADIENT_CHECKPOINTING] recompute each block's" in text
    assert "(--method fpft only)" in text.split("--fp16 ")[1][:200]


def test_help_describes_them_without_listing(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--help-training-args lists them" in text and "--report-to" in text
    assert "--save-total-limit" not in text
