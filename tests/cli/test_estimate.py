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
