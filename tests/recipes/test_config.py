"""The recipe's configuration: validation, config files, layering of sources, resume lookup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hiftune.errors import UserError
from hiftune.recipes.config import (
    RUN_CONFIG,
    TrainRecipeConfig,
    build_config,
    find_checkpoint,
    read_config_file,
)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        TrainRecipeConfig(method="lora")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        TrainRecipeConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr must be a positive"):
        TrainRecipeConfig(lr=-1.0)
    with pytest.raises(ValueError, match="fp16"):
        TrainRecipeConfig(method="fpft", precision="fp16")
    assert TrainRecipeConfig(label_words="bad, good").label_words == ["bad", "good"]


def test_bad_values_are_user_errors() -> None:
    # The CLI turns exactly these into one line and exit code 2; Python callers catch them too.
    with pytest.raises(UserError, match="optimizer must be one of adamw, sgd"):
        TrainRecipeConfig(optimizer="lion")
    with pytest.raises(UserError, match="unknown option 'learning_rte'"):
        build_config({"learning_rte": 0.1})
    with pytest.raises(UserError, match="scheduler must be one of linear"):
        TrainRecipeConfig(scheduler="reduce_lr_on_plateau")  # needs metrics HiFT has no cycle of


def test_system_prompt_and_chat_template_are_sft_options() -> None:
    cfg = TrainRecipeConfig(task="sft", system_prompt="", chat_template="{{ messages }}")
    assert (cfg.system_prompt, cfg.chat_template) == ("", "{{ messages }}")
    with pytest.raises(UserError, match="system_prompt is for task sft only"):
        TrainRecipeConfig(system_prompt="Be brief.")
    with pytest.raises(UserError, match="chat_template must be a file or a Jinja string"):
        TrainRecipeConfig(task="sft", chat_template=" ")
    with pytest.raises(UserError, match="system_prompt must be text"):
        build_config({"task": "sft", "system_prompt": 3})


def test_file_then_explicit_values(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("units-per-group: 2\nlr: 0.5\n")
    cfg = build_config({"config": str(path), "lr": 0.01})
    assert (cfg.units_per_group, cfg.lr, cfg.config) == (2, 0.01, str(path))
    assert read_config_file(path) == {"units_per_group": 2, "lr": 0.5}
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"seed": 3}))
    assert build_config({"config": str(as_json)}).seed == 3
    as_json.write_text("[1, 2]")
    with pytest.raises(UserError, match="must hold a mapping"):
        build_config({"config": str(as_json)})


def test_resume_takes_the_saved_run_as_base(tmp_path: Path) -> None:
    for step in (2, 10):  # the latest checkpoint by number, not by name
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    saved = TrainRecipeConfig(lr=0.3, max_steps=6, resume="old", config="old.yaml").to_dict()
    (tmp_path / RUN_CONFIG).write_text(json.dumps({"config": saved}))
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    cfg = build_config({"resume": str(tmp_path), "max_steps": 9})
    assert (cfg.lr, cfg.max_steps, cfg.resume, cfg.config) == (0.3, 9, str(tmp_path), None)
    assert cfg.always_active == "auto"
    # A run saved before always_active existed trained a new head in the split: it still does.
    del saved["always_active"]
    (tmp_path / RUN_CONFIG).write_text(json.dumps({"config": saved}))
    assert build_config({"resume": str(tmp_path)}).always_active == "none"


# --- the schedule options (issue 19) -------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"units_per_group": 0}, "units_per_group must be an integer >= 1 or auto, got 0"),
        ({"units_per_group": "some"}, "units_per_group must be an integer >= 1 or auto"),
        ({"units_per_group": "2.5"}, "units_per_group must be an integer >= 1 or auto"),
        ({"steps_per_group": 0}, "steps_per_group must be an integer >= 1, got 0"),
        ({"always_active_lr_scale": 0}, "always_active_lr_scale must be a number > 0"),
        ({"always_active_lr_scale": "inf"}, "always_active_lr_scale must be a number > 0"),
        ({"always_active": "classifier.("}, "always_active has an invalid regex 'classifier.('"),
        ({"always_active": 3}, "always_active must be auto, none or parameter-name regexes"),
        (
            {"method": "fpft", "always_active": "classifier.*"},
            "always_active=classifier.* is HiFT's schedule (--method hift)",
        ),
        ({"method": "fpft", "steps_per_group": 2}, "steps_per_group=2 is HiFT's schedule"),
        (
            {"method": "fpft", "always_active_lr_scale": 2},
            "always_active_lr_scale=2 is HiFT's schedule",
        ),
    ],
)
def test_bad_values_are_one_line_errors(fields: dict, match: str) -> None:
    with pytest.raises(UserError) as info:
        TrainRecipeConfig(**fields)
    message = str(info.value)
    assert match in message and "\n" not in message


def test_the_options_reach_the_engine() -> None:
    cfg = TrainRecipeConfig(
        units_per_group="3",  # as a config file's text
        steps_per_group=2,
        always_active="classifier\\..*",
        always_active_lr_scale="3",
    )
    hift = cfg.hift_config()
    assert (hift.units_per_group, hift.steps_per_group) == (3, 2)
    assert (hift.always_active, hift.always_active_lr_scale) == (("classifier\\..*",), 3.0)
    # auto options take what the schedule settled, or their fallbacks before it has.
    auto = TrainRecipeConfig(units_per_group="auto")
    assert auto.hift_config().units_per_group == 4 and auto.hift_config().always_active == ()
    settled = auto.hift_config(units_per_group=2, always_active=["score\\.weight"])
    assert (settled.units_per_group, settled.always_active) == (2, ("score\\.weight",))
    # FPFT ignores the split options it has no use for; their defaults pass.
    assert TrainRecipeConfig(method="fpft", units_per_group="auto", always_active="none")
