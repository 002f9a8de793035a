"""``hiftune train``'s options: the schedule flags reach the recipe's configuration."""

from __future__ import annotations

import pytest

from hiftune.cli import parse_args
from hiftune.cli.train import config_from_args
from hiftune.recipes.config import TrainRecipeConfig
from hiftune.recipes.schedule import ALWAYS_ACTIVE_LR_SCALE, UNITS_PER_GROUP


def parse(*argv: str) -> TrainRecipeConfig:
    return config_from_args(parse_args(["train", *argv]))


def test_schedule_flags_reach_the_config() -> None:
    cfg = parse(
        "--units-per-group", "auto", "--steps-per-group", "2",
        "--always-active", r"classifier\..*,score\.weight", "--always-active-lr-scale", "3",
    )  # fmt: skip
    assert cfg.units_per_group == "auto" and cfg.steps_per_group == 2
    assert cfg.always_active == [r"classifier\..*", r"score\.weight"]
    assert cfg.always_active_lr_scale == 3.0
    hift = cfg.hift_config()
    assert (hift.steps_per_group, hift.always_active_lr_scale) == (2, 3.0)
    assert hift.always_active == (r"classifier\..*", r"score\.weight")
    assert parse("--always-active", "NONE").always_active == "none"
    assert parse("--units-per-group", "3").units_per_group == 3


def test_sft_prompt_flags_reach_the_config() -> None:
    cfg = parse("--task", "sft", "--system-prompt", "", "--chat-template", "{{ messages }}")
    assert (cfg.system_prompt, cfg.chat_template) == ("", "{{ messages }}")


def test_schedule_defaults_are_the_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = parse()
    assert (cfg.units_per_group, cfg.always_active, cfg.steps_per_group) == (
        UNITS_PER_GROUP,
        "auto",
        1,
    )
    assert cfg.always_active_lr_scale == ALWAYS_ACTIVE_LR_SCALE
    with pytest.raises(SystemExit):
        parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "--units-per-group UNITS_PER_GROUP, -m UNITS_PER_GROUP m, units trained together; auto: "
        "the smallest m"
    ) in text
    assert "(default auto)" in text and "factor on their learning rate (default 3)" in text
    assert "--steps-per-group STEPS_PER_GROUP K," in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--units-per-group", "0"], "must be an integer >= 1 or auto, got '0'"),
        (["--units-per-group", "many"], "must be an integer >= 1 or auto, got 'many'"),
        (["--steps-per-group", "0"], "must be >= 1, got 0"),
        (["--always-active-lr-scale", "-1"], "must be a number > 0, got '-1'"),
        (["--always-active-lr-scale", "nan"], "must be a number > 0, got 'nan'"),
    ],
)
def test_bad_flag_values_are_refused(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["train", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
