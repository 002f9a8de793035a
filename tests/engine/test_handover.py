"""Taking a model over and handing it back (engine/handover.py), through HiFTOptimizer."""

import pytest
import torch

from hiftune import HiFTConfig, HiFTOptimizer
from tinymodels import TinyLM, assert_a_cycle_changes_every_parameter, hook_count


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
    assert hook_count(model) == 0
    opt = HiFTOptimizer(model, torch.optim.SGD, lr=0.1)
    assert_a_cycle_changes_every_parameter(model, opt)
