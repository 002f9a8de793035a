"""One HiFTOptimizer per model: refused while one lives, undone when one was dropped unclosed."""

import copy
import io

import pytest
import torch

from hiftune import HiFTConfig, HiFTOptimizer
from tinymodels import TinyLM, lm_loss, train_steps


def _assert_a_cycle_changes_every_parameter(model, opt):
    """The optimizer trains every group: a full cycle changes every parameter."""
    before = copy.deepcopy(model.state_dict())
    train_steps(model, opt, [torch.randint(0, 32, (2, 8))] * opt.num_groups)
    assert all(not torch.equal(before[n], p) for n, p in model.state_dict().items())


def _hooks(model):
    return sum(len(b._forward_pre_hooks) + len(b._forward_hooks) for b in model.blocks)


def test_close_hands_the_model_back_whole():
    model = TinyLM()
    opt = HiFTOptimizer(model, torch.optim.SGD, lr=0.1)
    opt.close()
    # close() hands the model back whole: trainable again, no truncation hooks left.
    assert all(p.requires_grad for p in model.parameters()) and _hooks(model) == 0
    again = HiFTOptimizer(model, torch.optim.SGD, lr=0.1)
    assert again.num_groups == opt.num_groups == 7


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_new_optimizer_takes_the_model_over_from_a_live_one(precision):
    model = TinyLM()
    ids = torch.randint(0, 32, (2, 8))
    old = HiFTOptimizer(model, torch.optim.SGD, HiFTConfig(precision=precision), lr=0.1)
    lm_loss(model, ids).backward()
    old.step()
    with pytest.warns(UserWarning, match=r"driven by HiFTOptimizer.*takes it over"):
        new = HiFTOptimizer(model, torch.optim.SGD, HiFTConfig(units_per_group=2), lr=0.1)
    # The old one's freezing and hooks are gone, only the new one's are there, and the old
    # one's mixed precision was undone before the new one (fp32 here) wrapped the model.
    assert _hooks(model) == 2 * len(model.blocks)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == [
        any(p is q for q in new.active_parameters()) for p in model.parameters()
    ]
    for call in (old.step, old.state_dict, lambda: old.load_state_dict(new.state_dict())):
        with pytest.raises(RuntimeError, match="newer HiFTOptimizer took its model over"):
            call()
    _assert_a_cycle_changes_every_parameter(model, new)


def test_an_optimizer_dropped_without_close_is_undone_on_the_next_wrap():
    model = TinyLM()
    opt = HiFTOptimizer(model, torch.optim.SGD, lr=0.1)
    del opt  # no close(), no gc.collect(): the next wrap must cope
    assert sum(p.requires_grad for p in model.parameters()) < 4  # still frozen by the dead one
    with pytest.warns(UserWarning, match="without close"):
        again = HiFTOptimizer(model, torch.optim.SGD, lr=0.1)
    assert again.num_groups == 7 and _hooks(model) == 2 * len(model.blocks)  # one hook pair each
    _assert_a_cycle_changes_every_parameter(model, again)


def test_a_driven_model_still_pickles_and_deep_copies():
    model = TinyLM()
    HiFTOptimizer(model, torch.optim.SGD, lr=0.1)
    torch.save(model, io.BytesIO())
    assert isinstance(copy.deepcopy(model), TinyLM)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("fail_at", [0, 3])
def test_a_construction_that_fails_hands_the_model_back_as_it_was(precision, fail_at):
    # The optimizer refuses its arguments at group `fail_at`, after earlier groups' masters were
    # made and the model partly cast: every weight comes back in fp32 with its exact values,
    # trainable, with no shard views or wrapped forwards, and the model can be wrapped again.
    torch.manual_seed(0)
    model = TinyLM(vocab=200, tie=True)  # the tied vocabulary in row shards
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []

    def refuse(named):
        calls.append(len(calls))
        if len(calls) > fail_at:
            raise ValueError("bad option")
        return [{"params": [p for _, p in named]}]

    config = HiFTConfig(precision=precision, offload="none")
    with pytest.raises(ValueError, match="bad option"):
        HiFTOptimizer(model, torch.optim.AdamW, config, param_groups_fn=refuse, lr=1e-2)
    assert len(calls) == fail_at + 1
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.requires_grad, n
        assert torch.equal(p.detach(), before[n]), n
    assert all("forward" not in vars(m) for m in model.modules())
    assert _hooks(model) == 0
    opt = HiFTOptimizer(model, torch.optim.SGD, lr=0.1)
    _assert_a_cycle_changes_every_parameter(model, opt)
