"""The plan stated before training: units, groups, peak group, estimated memory, data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hiftune.engine.units import group_name, group_units, split_units
from hiftune.memory.estimate import estimate
from hiftune.recipes.config import TrainRecipeConfig
from hiftune.recipes.plan import build_plan, compress_names


def test_compress_names() -> None:
    assert compress_names(["embed", *[f"layers.{i}" for i in range(30)], "head"]) == (
        "embed, layers.0-29, head"
    )
    assert compress_names(["embed..layers.2", "layers.3..layers.6", "head"]) == (
        "embed..layers.2, layers.3-6, head"
    )
    assert compress_names(["h.1", "h.3", "h.4", "norm", "h.5"]) == "h.1, h.3-4, norm, h.5"
    slices = [f"embed[{i * 64}:{(i + 1) * 64}]" for i in range(8)]
    assert compress_names([*slices, "layers.0"]) == "embed[0:512] in 8 slices, layers.0"
    assert compress_names(["embed[0:64]..embed[192:256]"]) == "embed[0:256]"
    assert compress_names([]) == ""


@pytest.fixture(scope="module")
def llama(tiny_llama: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama)


@pytest.mark.parametrize("m", [1, 3])
def test_plan_states_the_split_and_the_estimate(llama, m: int) -> None:
    cfg = TrainRecipeConfig(units_per_group=m, batch_size=2, max_length=16, optimizer="adamw")
    before = {n: p.detach().clone() for n, p in llama.named_parameters()}
    plan = build_plan(
        llama, cfg, name="tiny", data="train: 8 of x.jsonl", train_examples=8, eval_examples=2
    )
    # The split is the engine's, the memory the estimator's for this batch and length.
    units = split_units(llama)
    groups = group_units(units, m)
    assert plan.units == [u.name for u in units]
    assert plan.groups == [group_name(g) for g in groups]
    rows = {
        r.method: r
        for r in estimate(
            llama.config, units_per_group=m, optimizers=["adamw"], precisions=["fp32"],
            batch_size=2, seq_len=16,
        )
    }  # fmt: skip
    assert plan.hift is not None and plan.fpft is not None
    assert plan.hift.states == rows["hift"].states_mib and plan.fpft.grads == rows["fpft"].grads_mib
    assert plan.hift.activations == rows["hift"].activations_mib_estimate
    assert plan.hift.total < plan.fpft.total
    sizes = [sum(p.numel() for u in g for n, p in llama.named_parameters() if n in u.params)
             for g in groups]  # fmt: skip
    assert plan.peak_group_params == max(sizes)
    text = plan.format()
    assert "units: 4 (embed, layers.0-1, head)" in text
    assert f"groups: {len(groups)} of m={m}" in text and "HiFT" in text and "FPFT" in text
    assert "data: train: 8 of x.jsonl" in text
    assert "examples: 8 for training, 2" in build_plan(llama, cfg, name="t", train_examples=8,
                                                       eval_examples=2).format()  # fmt: skip
    json.dumps(plan.to_dict())  # report.json material
    for n, p in llama.named_parameters():  # the loaded model is left alone
        assert p.requires_grad and p.equal(before[n]), n


def test_plan_names_what_it_cannot_work_out(llama) -> None:
    cfg = TrainRecipeConfig(units_per_group=1, method="fpft", max_length=16)
    config = llama.config
    try:
        llama.config = type("Opaque", (), {"num_labels": 2})()  # no architecture to rebuild
        plan = build_plan(llama, cfg, name="tiny")
    finally:
        llama.config = config
    assert plan.hift is None and any("no memory estimate" in n for n in plan.notes)
    assert plan.units and "full fine-tuning" in plan.format()
