"""Options shared by train, estimate and inspect: one definition, the recipe's defaults."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from hiftune.cli import build_parser, main, parse_args
from hiftune.cli.options import add_split_arguments, split_config
from hiftune.cli.train import config_from_args
from hiftune.recipes.schedule import (
    ALWAYS_ACTIVE,
    FALLBACK_UNITS_PER_GROUP,
    STEPS_PER_GROUP,
    UNITS_PER_GROUP,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from hubcache import HubCache


def _llama(path: Path, layers: int = 6) -> Path:
    """A config.json of a llama with ``layers`` blocks (``layers + 2`` units), no weights."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "llama",
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "tie_word_embeddings": False,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_split_options_become_the_engine_config() -> None:
    parser = argparse.ArgumentParser()
    add_split_arguments(parser)
    default = split_config(parser.parse_args([]))
    assert (default.max_unit_params, default.group_by, default.units_per_group) == (
        "auto",
        "count",
        1,
    )
    config = split_config(parser.parse_args(["--max-unit-params", "none", "--group-by", "size"]))
    assert (config.max_unit_params, config.group_by) == (None, "size")


@pytest.mark.parametrize("command", ["estimate", "inspect"])
def test_memory_tools_default_to_train_s_schedule(command: str) -> None:
    args = parse_args([command, "some-model"])
    assert (args.units_per_group, args.steps_per_group, args.always_active) == (
        UNITS_PER_GROUP,
        STEPS_PER_GROUP,
        ALWAYS_ACTIVE,
    )
    train = config_from_args(parse_args(["train"]))
    assert (train.units_per_group, train.steps_per_group, train.always_active) == (
        args.units_per_group,
        args.steps_per_group,
        args.always_active,
    )


def _option(command: str, flag: str) -> argparse.Action:
    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return next(a for a in sub.choices[command]._actions if flag in a.option_strings)


@pytest.mark.parametrize("flag", ["--units-per-group", "--steps-per-group", "--always-active"])
def test_one_definition_of_each_schedule_option(flag: str) -> None:
    train, estimate, inspect = (_option(c, flag) for c in ("train", "estimate", "inspect"))
    assert train.help == estimate.help == inspect.help
    assert train.type is estimate.type is inspect.type
    assert train.option_strings == estimate.option_strings == inspect.option_strings


def test_estimate_auto_is_train_s_fallback_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(_llama(tmp_path))
    assert main(["estimate", model, "--optimizer", "adamw", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert f"m={FALLBACK_UNITS_PER_GROUP};" in out.splitlines()[0]
    assert f"Note: m={FALLBACK_UNITS_PER_GROUP}: auto without the run's number of steps" in out
    # The same split as an explicit --units-per-group 4, note aside.
    assert main(["estimate", model, "-m", "4", "--optimizer", "adamw", "--precision", "fp32"]) == 0
    explicit = capsys.readouterr().out
    assert explicit == out.split("Note:")[0]


def test_inspect_auto_groups_and_a_new_head_always_active(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(_llama(tmp_path))
    assert main(["inspect", model, "--json", "--no-grad-check"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["units_per_group"] == FALLBACK_UNITS_PER_GROUP
    assert len(result["groups"]) == 2  # 8 units in groups of 4
    assert result["schedule"]["always_active"] == []  # a language model's head is not new
    argv = ["inspect", model, "--task", "seq-cls", "--json", "--no-grad-check", "-m", "2"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["schedule"]["always_active"] == ["score.weight"]
    assert all("score.weight" not in u["name"] for u in result["units"])
    assert main([*argv, "--always-active", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["schedule"]["always_active"] == []


def test_a_hub_id_is_read_as_train_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = HubCache(tmp_path, monkeypatch)
    cache.add_model("HuggingFaceTB/SmolLM2-135M", _llama(tmp_path / "files", layers=2))
    argv = ["inspect", "HuggingFaceTB/SmolLM2-135M", "--json", "--no-grad-check", "-m", "1"]
    assert main(argv) == 0
    units = [u["name"] for u in json.loads(capsys.readouterr().out)["units"]]
    assert units == ["embed", "layers.0", "layers.1", "head"]
    assert main(["estimate", "HuggingFaceTB/SmolLM2-135M", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)
    # An id that is not cached, offline: one line naming what was tried, exit 2.
    assert main(["estimate", "nobody/nothing"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tried the Hugging Face Hub" in err
