"""One HiFTOptimizer per model: refused while one lives, undone when one was dropped unclosed."""

import copy
import io

import pytest
import torch

from hiftune import HiFTConfig, HiFTOptimizer
from tinymodels import (
    TinyLM,
    assert_a_cycle_changes_every_parameter,
    hook_count,
    lm_loss,
    train_steps,
)


def test_close_hands_the_model_back_whole():
    model = TinyLM()
    opt = HiFTOptimizer(model, torch.optim.SGD, lr=0.1)
    opt.close()
    # close() hands the model back whole: trainable again, no truncation hooks left.
    assert all(p.requires_grad for p in model.parameters()) and hook_count(model) == 0
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
    assert hook_count(model) == 2 * len(model.blocks)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == [
        any(p is q for q in new.active_parameters()) for p in model.parameters()
    ]
    for call in (old.step, old.state_dict, lambda: old.load_state_dict(new.state_dict())):
        with pytest.raises(RuntimeError, match="newer HiFTOptimizer took its model over"):
            call()
    assert_a_cycle_changes_every_parameter(model, new)


def test_an_optimizer_dropped_without_close_is_undone_on_the_next_wrap():
    model = TinyLM()
    opt = HiFTOptimizer(model, torch.optim.SGD, lr=0.1)
    del opt  # no close(), no gc.collect(): the next wrap must cope
    assert sum(p.requires_grad for p in model.parameters()) < 4  # still frozen by the dead one
    with pytest.warns(UserWarning, match="without close"):
        again = HiFTOptimizer(model, torch.optim.SGD, lr=0.1)
    assert again.num_groups == 7 and hook_count(model) == 2 * len(
        model.blocks
    )  # one hook pair each
    assert_a_cycle_changes_every_parameter(model, again)


def test_a_driven_model_still_pickles_and_deep_copies():
    model = TinyLM()
    HiFTOptimizer(model, torch.optim.SGD, lr=0.1)
    torch.save(model, io.BytesIO())
    assert isinstance(copy.deepcopy(model), TinyLM)


def _pickled(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_copy_of_a_driven_model_is_a_plain_model(batches, how, precision):
    # A copy taken mid-cycle (a "best model" snapshot) used to keep HiFT's freezing and its
    # backward-truncation hooks, without any optimizer to ever undo them.
    torch.manual_seed(0)
    model = TinyLM()
    model.pos.weight.requires_grad_(False)  # the user's own freezing is kept
    opt = HiFTOptimizer(model, torch.optim.SGD, HiFTConfig(precision=precision), lr=0.1)
    train_steps(model, opt, batches[:4])  # a block is active: the blocks below it are cut off
    frozen = [p.requires_grad for p in model.parameters()]
    copied = copy.deepcopy(model) if how == "deepcopy" else _pickled(model)
    assert [n for n, p in copied.named_parameters() if not p.requires_grad] == ["pos.weight"]
    assert hook_count(copied) == 0
    # Its gradients are a plain model's: every trainable parameter gets its full gradient.
    plain = TinyLM().to(copied.embed.weight.dtype)
    plain.load_state_dict(copied.state_dict())
    lm_loss(copied, batches[4]).backward()
    lm_loss(plain, batches[4]).backward()
    for (n, p), q in zip(copied.named_parameters(), plain.parameters(), strict=True):
        if n != "pos.weight":
            torch.testing.assert_close(p.grad, q.grad, msg=n)
    # The driven model is untouched and trains on.
    assert [p.requires_grad for p in model.parameters()] == frozen
    assert hook_count(model) == 2 * len(model.blocks)
    train_steps(model, opt, batches[5:8])
    assert opt.steps == 7
