"""The importance order against a naive loop, and its draws against their probabilities.

The naive loop trains with plain ``torch.optim.AdamW`` instances, one per group, scores each group
by hand (the mean squared gradient of the step it takes) and asks an
:class:`ImportanceSampler` holding those scores for the next group: HiFTOptimizer must score the
same gradients and so train the same groups with the same updates, with any paging.
"""

import copy

import pytest
import torch

from hiftune import HiFTConfig, HiFTOptimizer
from hiftune.engine.schedule.importance import ImportanceSampler, mean_square
from tinymodels import TinyLM, lm_loss, snapshot, train_steps

LR = 1e-2


def test_probabilities_keep_the_floor_and_follow_the_scores():
    sampler = ImportanceSampler(2, floor=0.5, scores=[1.0, 3.0])
    assert sampler.probabilities() == pytest.approx([0.375, 0.625])
    # a group not measured yet counts as the mean of the others
    sampler = ImportanceSampler(3, floor=0.4, scores=[2.0, None, 4.0])
    assert sampler.probabilities() == pytest.approx(
        [0.4 / 3 + 0.6 * 2 / 9, 0.4 / 3 + 0.6 * 3 / 9, 0.4 / 3 + 0.6 * 4 / 9]
    )
    # a zero score still gets the floor: the group never starves
    sampler = ImportanceSampler(4, floor=0.2, scores=[0.0, 0.0, 0.0, 5.0])
    assert sampler.probabilities() == pytest.approx([0.05, 0.05, 0.05, 0.85])
    assert ImportanceSampler(3).probabilities() == pytest.approx([1 / 3] * 3)


def test_draws_are_reproducible_and_follow_the_probabilities():
    sampler = ImportanceSampler(4, seed=7, floor=0.2, scores=[0.0, 1.0, 0.0, 3.0])
    draws = [sampler.choose(v) for v in range(4000)]
    assert draws == [
        ImportanceSampler(4, 7, 0.2, [0.0, 1.0, 0.0, 3.0]).choose(v) for v in range(4000)
    ]
    share = [draws.count(b) / len(draws) for b in range(4)]
    assert share == pytest.approx(sampler.probabilities(), abs=0.03)
    other_seed = [ImportanceSampler(4, 8, 0.2, [0.0, 1.0, 0.0, 3.0]).choose(v) for v in range(50)]
    assert other_seed != draws[:50]


def test_mean_square_is_per_element():
    grads = [torch.full((2, 2), 2.0), None, torch.full((4,), 1.0)]
    assert mean_square(grads) == pytest.approx((4 * 4 + 4 * 1) / 8)
    assert mean_square([None]) == 0.0


def naive_importance(model, batches, *, seed, floor, k_steps):
    """order="importance" by hand: one bottom-up cycle, then draws from hand-computed scores."""
    groups = [
        [*model.embed.parameters(), *model.pos.parameters()],
        *[list(b.parameters()) for b in model.blocks],
        [*model.norm.parameters(), *model.lm_head.parameters()],
    ]
    optimizers = [torch.optim.AdamW(g, lr=LR) for g in groups]
    sampler = ImportanceSampler(len(groups), seed, floor)
    active, visits = 0, []
    for step, ids in enumerate(batches):
        if step % k_steps == 0:  # a new visit
            visit = step // k_steps
            active = visit if visit < len(groups) else sampler.choose(visit)
            visits.append(active)
        for g, params in enumerate(groups):
            for p in params:
                p.requires_grad_(g == active)
        lm_loss(model, ids).backward()
        grads = [p.grad.flatten() for p in groups[active]]
        sampler.scores[active] = float(torch.cat(grads).pow(2).mean())
        optimizers[active].step()
        optimizers[active].zero_grad()
    return visits


@pytest.mark.parametrize("offload", ["none", "host", "disk"])
@pytest.mark.parametrize("k_steps", [1, 2])
def test_importance_order_follows_the_naive_loop(batches, offload, k_steps):
    torch.manual_seed(0)
    model = TinyLM()
    reference = copy.deepcopy(model)
    config = HiFTConfig(
        max_unit_params=None, offload=offload, order="importance", seed=3, importance_floor=0.3,
        steps_per_group=k_steps,
    )  # fmt: skip
    opt = HiFTOptimizer(model, torch.optim.AdamW, config, lr=LR)
    data = (batches * 4)[: 4 * opt.steps_per_cycle]
    visits = naive_importance(reference, data, seed=3, floor=0.3, k_steps=k_steps)
    seen = []
    for i, ids in enumerate(data):
        if i % k_steps == 0:
            seen.append(opt.active_group)
        lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
    assert seen == visits
    assert seen[: opt.num_groups] == list(range(opt.num_groups))  # the first cycle: bottom-up
    assert seen[opt.num_groups :] != list(range(opt.num_groups)) * 3  # then drawn
    assert opt.cycle == len(visits) // opt.num_groups
    want = snapshot(reference)
    for n, p in snapshot(model).items():
        torch.testing.assert_close(p, want[n], msg=n)
    opt.close()


@pytest.mark.parametrize(
    ("offload", "max_unit_params"), [("host", None), ("disk", None), ("host", 300)]
)
def test_resume_draws_what_the_uninterrupted_run_draws(batches, tmp_path, offload, max_unit_params):
    """Also with row shards (``max_unit_params=300`` splits the embedding by rows)."""
    config = HiFTConfig(
        offload=offload, order="importance", max_unit_params=max_unit_params, steps_per_group=2
    )
    torch.manual_seed(0)
    model = TinyLM()
    twin = copy.deepcopy(model)
    opt = HiFTOptimizer(model, torch.optim.AdamW, config, lr=LR)
    data = (batches * 4)[: 3 * opt.steps_per_cycle + 1]
    expected = train_steps(model, opt, data)
    cut = opt.steps_per_cycle + 3  # past the first cycle, in the middle of a visit

    first = HiFTOptimizer(twin, torch.optim.AdamW, config, lr=LR)
    losses = train_steps(twin, first, data[:cut])
    path = tmp_path / "opt.pt"
    torch.save(first.state_dict(), path)
    saved = copy.deepcopy(twin.state_dict())
    first.close()
    twin.load_state_dict(saved)
    second = HiFTOptimizer(twin, torch.optim.AdamW, config, lr=LR)
    second.load_state_dict(torch.load(path, weights_only=True))
    losses += train_steps(twin, second, data[cut:])
    assert losses == expected
    for n, p in snapshot(twin).items():
        assert torch.equal(p, dict(model.named_parameters())[n]), n
    opt.close()
    second.close()


def test_mixed_precision_scores_the_fp32_gradients(batches):
    torch.manual_seed(0)
    model = TinyLM()
    opt = HiFTOptimizer(
        model, torch.optim.AdamW, HiFTConfig(order="importance", precision="bf16"), lr=LR
    )
    sampler = opt._rotation.sampler
    for ids in batches[: opt.num_groups + 2]:
        b = opt._rotation.active
        lm_loss(model, ids).backward()
        expected = mean_square(p.grad for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad()
        assert sampler.scores[b] == pytest.approx(expected, rel=1e-6)
    assert all(s is not None for s in sampler.scores)
    opt.close()


def test_bad_importance_settings_fail_clearly(batches, monkeypatch):
    for floor in (0, 1.5, "half", True):
        with pytest.raises(ValueError, match="importance_floor"):
            HiFTConfig(order="importance", importance_floor=floor)
    torch.manual_seed(0)
    model = TinyLM()
    opt = HiFTOptimizer(model, torch.optim.AdamW, HiFTConfig(order="importance"), lr=LR)
    train_steps(model, opt, batches[:2])
    state = opt.state_dict()
    assert len(state["hift"]["importance_scores"]) == opt.num_groups
    state["hift"]["importance_scores"] = [float("nan")] * opt.num_groups
    with pytest.raises(ValueError, match="importance score nan"):
        opt.load_state_dict(state)
    state["hift"]["importance_scores"] = [1.0]
    with pytest.raises(ValueError, match="not one per group"):
        opt.load_state_dict(state)
    opt.close()
    # FSDP2 shards gradients: each rank would draw alone, so the order refuses such a model.
    monkeypatch.setattr("hiftune.engine.schedule.rotation.is_sharded", lambda p: True)
    with pytest.raises(ValueError, match="FSDP2"):
        HiFTOptimizer(TinyLM(), torch.optim.AdamW, HiFTConfig(order="importance"), lr=LR)
