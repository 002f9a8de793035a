"""The schedule options against a naive loop: always-active parameters, their LR scale, K steps.

The naive loop is the schedule written out by hand with plain ``torch.optim`` instances: one per
rotating group, one more for the always-active parameters (learning rate times the scale), groups
frozen by ``requires_grad``, K consecutive steps per group, and a learning rate that changes once
per cycle of ``k * K`` steps. HiFTOptimizer must follow it step by step, with any paging.
"""

import copy
import warnings

import pytest
import torch

from hiftune import HiFTConfig, HiFTOptimizer
from hiftune.engine.schedule.rotation import Rotation, cycles_in, updates_per_group
from hiftune.engine.split.units import split_model
from tinymodels import TinyLM, lm_loss, snapshot, train_steps

LR = 1e-2
HEAD = (r"lm_head\..*",)


def decay(cycle: int) -> float:
    return 1.0 / (1 + cycle)


def naive_hift(model, batches, *, k_steps, always, scale):
    """HiFT with the schedule options, by hand (the paper's split: whole parameters)."""
    embed = [*model.embed.parameters(), *model.pos.parameters()]
    head = [*model.norm.parameters()] + ([] if always else [*model.lm_head.parameters()])
    groups = [embed, *[list(b.parameters()) for b in model.blocks], head]
    optimizers = [torch.optim.AdamW(g, lr=LR) for g in groups]
    extra = torch.optim.AdamW(model.lm_head.parameters(), lr=LR * scale) if always else None
    losses = []
    for step, ids in enumerate(batches):
        cycle, within = divmod(step, len(groups) * k_steps)
        active = within // k_steps
        for g, params in enumerate(groups):
            for p in params:
                p.requires_grad_(g == active)
        stepped = [(optimizers[active], LR), *([(extra, LR * scale)] if extra else [])]
        for opt, base in stepped:
            opt.param_groups[0]["lr"] = base * decay(cycle)  # delayed: one LR per cycle
        loss = lm_loss(model, ids)
        loss.backward()
        for opt, _ in stepped:
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("offload", ["none", "host", "disk"])
@pytest.mark.parametrize(
    ("k_steps", "always", "scale"), [(1, True, 3.0), (3, False, 1.0), (2, True, 0.5)]
)
def test_schedule_follows_the_naive_loop(batches, offload, k_steps, always, scale):
    torch.manual_seed(0)
    model = TinyLM()
    reference = copy.deepcopy(model)
    config = HiFTConfig(
        max_unit_params=None,
        offload=offload,
        steps_per_group=k_steps,
        always_active=HEAD if always else (),
        always_active_lr_scale=scale,
    )
    opt = HiFTOptimizer(model, torch.optim.AdamW, config, lr=LR)
    sched = opt.delay(torch.optim.lr_scheduler.LambdaLR(opt, decay))
    steps = 2 * opt.steps_per_cycle + 1  # two cycles and the first step of a third
    data = (batches * 4)[:steps]
    expected = naive_hift(reference, data, k_steps=k_steps, always=always, scale=scale)
    losses = train_steps(model, opt, data, sched)
    assert opt.cycle == 2 and opt.steps == steps
    torch.testing.assert_close(losses, expected)
    want = snapshot(reference)
    for n, p in snapshot(model).items():
        torch.testing.assert_close(p, want[n], msg=n)
    opt.close()


def test_always_active_parameters_leave_the_split_and_train_every_step(batches):
    torch.manual_seed(0)
    model = TinyLM()
    units, always = split_model(model, HiFTConfig(always_active=HEAD))
    assert always is not None and always.params == ("lm_head.weight",)
    assert all("lm_head.weight" not in u.params for u in units)
    # the head runs after every block: its unit cuts below all of them
    assert always.cut == len(model.blocks)

    opt = HiFTOptimizer(model, torch.optim.AdamW, HiFTConfig(always_active=HEAD), lr=LR)
    assert opt.always_active_names == ["lm_head.weight"]
    assert all("lm_head.weight" not in g for g in opt.groups)
    assert opt.param_groups[-1]["params"][0] is model.lm_head.weight
    for ids in batches[: opt.num_groups]:
        before = model.lm_head.weight.detach().clone()
        assert any(p is model.lm_head.weight for p in opt.active_parameters())
        lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
        assert not torch.equal(before, model.lm_head.weight)
        assert model.lm_head.weight.requires_grad  # never frozen
    # its state stays in the optimizer (never paged): the AdamW step count is on the tensor
    assert opt.state[model.lm_head.weight]["step"].item() == opt.num_groups
    opt.close()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_masters_of_the_always_active_head(batches, precision):
    torch.manual_seed(0)
    model = TinyLM()
    fp32 = copy.deepcopy(model)
    # At the head's base rate, so that the tolerance below measures half-precision rounding.
    mixed = {"precision": precision, "init_loss_scale": 2.0**8}
    config = HiFTConfig(always_active=HEAD, always_active_lr_scale=1.0, **mixed)
    opt = HiFTOptimizer(model, torch.optim.AdamW, config, lr=LR)
    plain = HiFTConfig(always_active=HEAD, always_active_lr_scale=1.0)
    ref = HiFTOptimizer(fp32, torch.optim.AdamW, plain, lr=LR)
    data = batches[: 2 * opt.num_groups]
    for net, o in ((model, opt), (fp32, ref)):
        for ids in data:
            o.scale_loss(lm_loss(net, ids)).backward()
            o.step()
            o.zero_grad()
    assert model.lm_head.weight.dtype != torch.float32
    masters = opt.master_parameters()
    assert masters[-1].dtype == torch.float32 and masters[-1].shape == model.lm_head.weight.shape
    opt.close()
    ref.close()
    # close() hands the head its fp32 master, which tracks the fp32 run
    torch.testing.assert_close(model.lm_head.weight, fp32.lm_head.weight, atol=2e-2, rtol=0)


@pytest.mark.parametrize("offload", ["host", "disk"])
def test_resume_mid_visit_equals_the_uninterrupted_run(batches, tmp_path, offload):
    config = HiFTConfig(
        offload=offload, steps_per_group=3, always_active=HEAD, always_active_lr_scale=2.0
    )
    torch.manual_seed(0)
    model = TinyLM()
    twin = copy.deepcopy(model)
    opt = HiFTOptimizer(model, torch.optim.AdamW, config, lr=LR)
    data = (batches * 4)[: opt.steps_per_cycle + 4]
    expected = train_steps(model, opt, data)

    first = HiFTOptimizer(twin, torch.optim.AdamW, config, lr=LR)
    losses = train_steps(twin, first, data[:5])  # 5 = one visit of 3 and 2 steps into the next
    path = tmp_path / "opt.pt"
    torch.save(first.state_dict(), path)
    saved = copy.deepcopy(twin.state_dict())
    first.close()
    twin.load_state_dict(saved)
    second = HiFTOptimizer(twin, torch.optim.AdamW, config, lr=LR)
    second.load_state_dict(torch.load(path, weights_only=True))
    assert second.active_group == 1 and second.steps == 5
    losses += train_steps(twin, second, data[5:])
    assert losses == expected
    for n, p in snapshot(twin).items():
        assert torch.equal(p, dict(model.named_parameters())[n]), n
    opt.close()
    second.close()


def test_checkpoint_of_another_schedule_does_not_load(batches):
    torch.manual_seed(0)
    model = TinyLM()
    plain = HiFTOptimizer(model, torch.optim.AdamW, HiFTConfig(), lr=LR)
    state = plain.state_dict()
    plain.close()
    other = HiFTOptimizer(model, torch.optim.AdamW, HiFTConfig(always_active=HEAD), lr=LR)
    with pytest.raises(ValueError, match="always_active"):
        other.load_state_dict(state)
    other.close()
    k3 = HiFTOptimizer(model, torch.optim.AdamW, HiFTConfig(steps_per_group=3), lr=LR)
    train_steps(model, k3, batches[:2])
    mid_visit = k3.state_dict()
    k3.close()
    k1 = HiFTOptimizer(model, torch.optim.AdamW, HiFTConfig(), lr=LR)
    with pytest.raises(ValueError, match="steps_per_group=1"):
        k1.load_state_dict(mid_visit)
    k1.close()


def test_row_shards_with_an_always_active_head(batches):
    """Row shards rotate as before beside the always-active head, which is never sharded."""
    torch.manual_seed(0)
    model = TinyLM()
    config = HiFTConfig(max_unit_params=300, always_active=HEAD)
    with pytest.warns(UserWarning, match="larger than the largest rotating group"):
        opt = HiFTOptimizer(model, torch.optim.AdamW, config, lr=LR)
    assert any(
        "[" in label for g in opt._checkpoint.layout.names for label in g
    )  # the embedding is sharded
    assert opt._checkpoint.layout.names[-1] == ["lm_head.weight"]
    before = snapshot(model)
    train_steps(model, opt, (batches * 4)[: opt.num_groups])
    after = snapshot(model)
    assert all(not torch.equal(before[n], after[n]) for n in before), "a cycle trains everything"
    opt.close()


def test_tied_and_large_always_active_parameters_warn():
    model = TinyLM(tie=True)
    with pytest.warns(UserWarning, match="tied"):
        opt = HiFTOptimizer(model, torch.optim.AdamW, HiFTConfig(always_active=HEAD), lr=LR)
    assert opt.always_active_names == ["embed.weight"]
    opt.close()
    with pytest.warns(UserWarning, match="larger than the largest rotating group"):
        opt = HiFTOptimizer(
            TinyLM(vocab=512), torch.optim.AdamW, HiFTConfig(always_active=HEAD), lr=LR
        )
    opt.close()
    with pytest.warns(UserWarning, match="backward runs through"):
        opt = HiFTOptimizer(
            TinyLM(), torch.optim.AdamW, HiFTConfig(always_active=(r"blocks\.1\.norm\..*",)), lr=LR
        )
    opt.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a small untied head: no warning
        HiFTOptimizer(TinyLM(), torch.optim.AdamW, HiFTConfig(always_active=HEAD), lr=LR).close()


@pytest.mark.parametrize(
    ("patterns", "message"),
    [
        ((r"classifier\..*",), "match no trainable parameter"),
        ((".*",), "every trainable parameter"),
    ],
)
def test_bad_always_active_patterns_fail_clearly(patterns, message):
    with pytest.raises(ValueError, match=message):
        HiFTOptimizer(TinyLM(), torch.optim.AdamW, HiFTConfig(always_active=patterns), lr=LR)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps_per_group", 0),
        ("steps_per_group", 1.5),
        ("always_active_lr_scale", 0.0),
        ("always_active_lr_scale", float("inf")),
        ("always_active", [""]),
        ("always_active", ["("]),
    ],
)
def test_config_refuses_bad_schedule_values(field, value):
    with pytest.raises(ValueError, match=field):
        HiFTConfig(**{field: value})


def test_rotation_counts_visits_and_cycles():
    r = Rotation([2, 0, 1], steps_per_group=2)
    seen = []
    for _ in range(7):
        seen.append((r.active, r.group_steps, r.cycle))
        r.advance()
    assert seen == [(2, 0, 0), (2, 1, 0), (0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0), (2, 0, 1)]
    assert r.steps_per_cycle == 6 and r.steps == 7


def test_updates_per_group_and_cycles():
    assert updates_per_group(8, 10) == [1] * 8 + [0, 0]
    assert updates_per_group(50, 4) == [13, 13, 12, 12]
    assert updates_per_group(17, 3, 5) == [7, 5, 5]
    assert cycles_in(50, 4) == 13 and cycles_in(0, 4) == 1 and cycles_in(17, 3, 5) == 2
