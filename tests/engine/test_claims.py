"""One HiFTOptimizer per model: refused while one lives, undone when one was dropped unclosed."""

import copy
import io

import pytest
import torch

from hiftune import HiFTOptimizer
from tinymodels import TinyLM, lm_loss


def _hooks(model):
    return sum(len(b._forward_pre_hooks) + len(b._forward_hooks) for b in model.blocks)


def test_a_model_driven_by_an_optimizer_is_refused_until_close():
    model = TinyLM()
    opt = HiFTOptimizer(model, torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match=r"already driven by HiFTOptimizer.*close\(\)"):
        HiFTOptimizer(model, torch.optim.SGD, lr=0.1)
    opt.close()
    # close() hands the model back whole: trainable again, no truncation hooks left.
    assert all(p.requires_grad for p in model.parameters()) and _hooks(model) == 0
    again = HiFTOptimizer(model, torch.optim.SGD, lr=0.1)
    assert again.num_groups == opt.num_groups == 6


def test_an_optimizer_dropped_without_close_is_undone_on_the_next_wrap():
    model = TinyLM()
    opt = HiFTOptimizer(model, torch.optim.SGD, lr=0.1)
    del opt  # no close(), no gc.collect(): the next wrap must cope
    assert sum(p.requires_grad for p in model.parameters()) < 4  # still frozen by the dead one
    with pytest.warns(UserWarning, match="without close"):
        again = HiFTOptimizer(model, torch.optim.SGD, lr=0.1)
    assert again.num_groups == 6 and _hooks(model) == 2 * len(model.blocks)  # one hook pair each
    # The new optimizer trains every group: a full cycle changes every parameter.
    before = copy.deepcopy(model.state_dict())
    ids = torch.randint(0, 32, (2, 8))
    for _ in range(again.num_groups):
        lm_loss(model, ids).backward()
        again.step()
        again.zero_grad()
    assert all(not torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_a_driven_model_still_pickles_and_deep_copies():
    model = TinyLM()
    HiFTOptimizer(model, torch.optim.SGD, lr=0.1)
    torch.save(model, io.BytesIO())
    assert isinstance(copy.deepcopy(model), TinyLM)
