"""The plan stated before training: units, groups, peak group, estimated memory, data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hiftune.engine.split.units import group_name, group_units, split_units
from hiftune.memory.estimate import estimate
from hiftune.recipes.config import TrainRecipeConfig
from hiftune.recipes.plan import build_plan, compress_names
from hiftune.recipes.schedule import AlwaysActive, resolve_schedule


def test_compress_names() -> None:
    assert compress_names(["embed", *[f"layers.{i}" for i in range(30)], "head"]) == (
        "embed, layers.0-29, head"
    )
    # A group keeps the engine's name: "layers.3-6" would be four names, not one group.
    assert compress_names(["embed..layers.2", "layers.3..layers.6", "head"]) == (
        "embed..layers.2, layers.3..layers.6, head"
    )
    assert compress_names(["h.1", "h.3", "h.4", "norm", "h.5"]) == "h.1, h.3-4, norm, h.5"
    slices = [f"embed[{i * 64}:{(i + 1) * 64}]" for i in range(8)]
    assert compress_names([*slices, "layers.0"]) == "embed[0:512] in 8 slices, layers.0"
    assert compress_names(["embed[0:64]..embed[192:256]"]) == "embed[0:64]..embed[192:256]"
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
    hift = rows["hift"]
    assert plan.hift.activations == hift.activations_mib_estimate + hift.logits_mib_estimate
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


@pytest.mark.parametrize("offload", ["host", "disk", "none"])
def test_plan_splits_device_and_paged_memory_as_the_estimator(llama, offload: str) -> None:
    """The paged state is where the run's offload puts it; checkpointing shrinks activations."""
    cfg = TrainRecipeConfig(batch_size=2, max_length=16, optimizer="adamw", offload=offload)
    plan = build_plan(llama, cfg, name="tiny")
    (row,) = [
        r
        for r in estimate(
            llama.config, units_per_group=plan.units_per_group, optimizers=["adamw"],
            precisions=["fp32"], batch_size=2, seq_len=16, offload=offload,
        )
        if r.method == "hift"
    ]  # fmt: skip
    assert plan.hift is not None
    assert plan.hift.host == pytest.approx(row.host_gib * 1024)
    assert plan.hift.disk == pytest.approx(row.disk_gib * 1024)
    where = {"host": "in host memory", "disk": "in files on disk"}.get(offload)
    if where is None:  # nothing paged: everything is on the device
        assert plan.hift.host == plan.hift.disk == 0 and "paged out" not in plan.format()
    else:
        assert getattr(plan.hift, offload) > 0 and where in plan.format()
        assert json.loads(json.dumps(plan.to_dict()))["hift"][offload] == getattr(
            plan.hift, offload
        )
    ckpt = TrainRecipeConfig(
        batch_size=2, max_length=16, optimizer="adamw", offload=offload,
        training_args={"gradient_checkpointing": True},
    )  # fmt: skip
    recomputed = build_plan(llama, ckpt, name="tiny").hift
    assert recomputed is not None and plan.hift.activations is not None
    assert recomputed.activations is not None and recomputed.activations < plan.hift.activations


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


@pytest.fixture(scope="module")
def llama10(tmp_path_factory: pytest.TempPathFactory):
    """A tiny llama of 8 blocks: 10 units (embed, layers.0-7, head)."""
    from transformers import AutoModelForCausalLM

    from recipes.conftest import make_llama

    path = make_llama(tmp_path_factory.mktemp("llama10"), num_hidden_layers=8)
    return AutoModelForCausalLM.from_pretrained(path)


def test_budget_guard_names_the_groups_never_trained(llama10) -> None:
    # The case: 8 steps over 10 groups trained the head group never, and nothing said so.
    cfg = TrainRecipeConfig(units_per_group=1, max_steps=8, max_length=16)
    schedule = resolve_schedule(cfg, n_units=10, total_steps=8)
    plan = build_plan(llama10, cfg, name="tiny", schedule=schedule)
    assert plan.updates == [1] * 8 + [0, 0] and plan.total_steps == 8
    warning = (
        "8 optimizer steps over 10 groups of m=1: layers.7, head are never trained, fewer than "
        "the 8 updates each group should get; --units-per-group 10 gives 8 updates per group "
        "or --max-steps 80 gives every group 8"
    )
    assert plan.warnings == [warning]
    text = plan.format()
    assert (
        "  updates: 8 steps = 0 cycles of 10 groups and 8 steps: 1 update for embed, "
        "layers.0-6; none for layers.7, head\n"
    ) in text
    assert text.endswith(f"  warning: {warning}")
    assert plan.to_dict()["warnings"] == [warning]  # report.json keeps it
    # An epoch-based run is told in epochs; K steps per group count in the budget.
    cfg = TrainRecipeConfig(units_per_group=2, steps_per_group=3, max_length=16)
    schedule = resolve_schedule(cfg, n_units=10, total_steps=40)
    plan = build_plan(llama10, cfg, name="tiny", schedule=schedule, steps_per_epoch=20)
    assert plan.updates == [9, 9, 9, 7, 6]
    assert plan.budget == (
        "40 steps = 2 cycles of 5 groups x 3 steps and 10 steps: 9 updates for embed..layers.0, "
        "layers.1..layers.2, layers.3..layers.4; 7 updates for layers.5..layers.6; 6 updates for "
        "layers.7..head"
    )
    assert plan.warnings == [
        "40 optimizer steps over 5 groups of m=2 (3 steps per visit): layers.5..layers.6, "
        "layers.7..head "
        "get only 6-7 updates, fewer than the 8 updates each group should get; "
        "--units-per-group 4 gives 12 updates per group or --epochs 2.2 (44 steps) gives every "
        "group 8"
    ]


def test_plan_states_the_schedule(llama10) -> None:
    cfg = TrainRecipeConfig(units_per_group="auto", always_active_lr_scale=3, max_length=16)
    head = AlwaysActive(("model\\.norm\\.weight",), ("model.norm.weight",))
    schedule = resolve_schedule(cfg, always=head, n_units=9, total_steps=200)
    plan = build_plan(llama10, cfg, name="tiny", schedule=schedule)
    assert plan.units_per_group == 4 and plan.warnings == []
    # no head: it is always active
    assert plan.groups == ["embed..layers.2", "layers.3..layers.6", "layers.7"]
    lines = plan.format().splitlines()
    assert "  units per group: m=4, auto: the smallest m from 4 up whose groups each get at " in (
        "\n".join(lines)
    )
    assert (
        "  updates: 200 steps = 66 cycles of 3 groups and 2 steps: 67 updates for embed..layers.2, "
        "layers.3..layers.6; 66 updates for layers.7"
    ) in lines
    assert "  always active: model.norm.weight (lr x3)" in lines
    # Without a budget (no step count) or for FPFT, there is nothing to warn about.
    fpft = build_plan(llama10, TrainRecipeConfig(method="fpft", max_length=16), name="t")
    assert fpft.budget is None and fpft.warnings == [] and "always active" not in fpft.format()
