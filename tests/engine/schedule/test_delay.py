"""The delayed learning rate: the schedule advances once per cycle, not once per step."""

import pytest
import torch

from hiftune import HiFTConfig, HiFTOptimizer
from tinymodels import TinyLM, lm_loss


def test_delayed_lr_advances_once_per_cycle(tiny_lm, batches):
    opt = HiFTOptimizer(tiny_lm, torch.optim.SGD, HiFTConfig(), lr=1.0)
    sched = opt.delay(torch.optim.lr_scheduler.LambdaLR(opt, lambda cycle: 1 / (1 + cycle)))
    k = opt.num_groups
    lrs = []
    for ids in batches[: 2 * k + 1]:
        lrs.append(opt.param_groups[opt.active_group]["lr"])
        lm_loss(tiny_lm, ids).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert lrs == [1.0] * k + [0.5] * k + [1 / 3]
    assert sched.last_epoch == 2


def test_delay_refuses_a_scheduler_of_another_optimizer(tiny_lm):
    opt = HiFTOptimizer(tiny_lm, torch.optim.SGD, lr=1.0)
    other = torch.optim.SGD(TinyLM().parameters(), lr=1.0)
    with pytest.raises(ValueError, match="built on this HiFTOptimizer"):
        opt.delay(torch.optim.lr_scheduler.StepLR(other, step_size=1))
