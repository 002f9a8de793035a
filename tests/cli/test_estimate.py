"""``hiftune estimate --processes N --mode``: the per-rank table beside the usual one."""

from __future__ import annotations

import dataclasses
import json

import pytest

from hiftune.cli import main
from hiftune.memory.distributed import estimate_per_rank
from hiftune.recipes.schedule import FALLBACK_UNITS_PER_GROUP


@pytest.mark.parametrize("mode", ["dp", "sharded", "fsdp2"])
def test_per_rank_rows_are_the_busiest_rank_of_the_estimator(mode, capsys):
    argv = ["estimate", "smollm2-135m", "--optimizer", "adamw", "--precision", "fp32"]
    assert main([*argv, "--processes", "2", "--mode", mode, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ranks = estimate_per_rank(
        "smollm2-135m",
        processes=2,
        mode=mode,
        optimizer="adamw",
        units_per_group=FALLBACK_UNITS_PER_GROUP,  # auto without a step count, as train
    )
    busiest = max(ranks, key=lambda r: r.total_mib)
    assert out["per_rank"] == [json.loads(json.dumps(dataclasses.asdict(busiest)))]
    assert {r["method"] for r in out["rows"]} == {"fpft", "hift"}


def test_sharded_leaves_half_precision_out_and_says_so(capsys):
    argv = ["estimate", "smollm2-135m", "--optimizer", "adamw", "--precision", "fp32,bf16"]
    assert main([*argv, "--processes", "2", "--mode", "sharded"]) == 0
    out = capsys.readouterr().out
    assert "HiFT per rank on 2 process(es), mode sharded" in out
    assert "half-precision rows left out" in out
    per_rank = out.split("HiFT per rank", 1)[1]
    assert "| adamw | fp32 |" in per_rank and "| adamw | bf16 |" not in per_rank


def test_without_processes_the_json_stays_a_list(capsys):
    assert main(["estimate", "smollm2-135m", "--optimizer", "sgd", "--json"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), list)


def test_bad_process_count_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["estimate", "smollm2-135m", "--processes", "0"])
    assert e.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err


@pytest.fixture
def tiny_llama(tmp_path):
    """A config.json of a 4-block Llama: the fit search runs hundreds of estimates."""
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
    ).save_pretrained(tmp_path)
    return str(tmp_path)


def test_fit_prints_the_plan_and_exits_0_when_it_fits(tiny_llama, capsys):
    argv = ["estimate", tiny_llama, "--seq-len", "64", "--batch-size", "2"]
    assert main([*argv, "--fit", "0.02", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    plan = answer["plan"]
    assert plan["device_gib"] <= 0.02 and answer["least"] is None
    assert answer["fastest"]["relative_time"] == 1.0
    assert main([*argv, "--fit", "0.02"]) == 0
    out = capsys.readouterr().out
    assert f"--precision {plan['precision']} --offload {plan['offload']}" in out
    assert "| fits |" in out and "| fastest, ignoring the limits |" in out


def test_fit_exits_1_with_the_least_it_would_need(tiny_llama, capsys):
    argv = ["estimate", tiny_llama, "--seq-len", "64", "--batch-size", "1"]
    assert main([*argv, "--fit", "0.0001", "--host-memory", "1"]) == 1
    out = capsys.readouterr().out
    assert "Nothing fits: the plan needing the least device memory needs" in out
    assert "| least it would need | bf16 | disk | 1 |" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--host-memory", "8"], "--host-memory goes with --fit"),
        (["--fit", "8"], "--fit needs --batch-size and --seq-len"),
        (["--fit", "8", "--seq-len", "8", "--batch-size", "1", "--optimizer", "adamw,sgd"], "one"),
    ],
)
def test_fit_misuse_is_one_line(extra, message, capsys):
    assert main(["estimate", "smollm2-135m", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_checkpointing_and_offload_reach_the_rows(tiny_llama, capsys):
    argv = ["estimate", tiny_llama, "--optimizer", "adamw", "--precision", "bf16", "--json"]
    act = ["--seq-len", "32", "--batch-size", "1"]
    assert main([*argv, *act, "--offload", "disk", "--gradient-checkpointing"]) == 0
    rows = json.loads(capsys.readouterr().out)
    hift = next(r for r in rows if r["method"] == "hift")
    assert hift["offload"] == "disk" and hift["gradient_checkpointing"] is True
    assert hift["host_gib"] == 0 and hift["disk_gib"] == hift["paged_mib"] / 1024 > 0
    assert main([*argv, *act]) == 0
    plain = next(r for r in json.loads(capsys.readouterr().out) if r["method"] == "hift")
    assert plain["host_gib"] == hift["disk_gib"]  # host paging by default, as hiftune train
    assert plain["activations_mib_estimate"] > hift["activations_mib_estimate"]
