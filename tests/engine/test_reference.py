"""HiFTOptimizer against HiFT written out by hand, for k > 1 groups.

The naive loop below is the method as the paper states it, with nothing of hiftune but the seeded
shuffle of the random order: one ``torch.optim`` instance per group, freezing by ``requires_grad``,
and a learning rate that changes once per cycle. HiFTOptimizer (with its delayed scheduler) must
follow it step by step.
"""

import copy

import pytest
import torch
from torch import nn

from hiftune import HiFTConfig, HiFTOptimizer
from hiftune.engine.schedule.order import group_order
from tinymodels import TinyLM, lm_loss, snapshot, train_steps

LR = 1e-2
SEED = 5
CYCLES = 2

OPTIMIZERS = {
    "adamw": (torch.optim.AdamW, {"weight_decay": 0.1}),
    "sgd-momentum": (torch.optim.SGD, {"momentum": 0.9}),
}


def decay(cycle: int) -> float:
    """The schedule, in cycles."""
    return 1.0 / (1 + cycle)


#: The unit budget of each split: the paper's (none), and the default (the largest block).
SPLITS = {"paper": None, "default": "auto"}


def tinylm_units(model: TinyLM, split: str) -> list[list[nn.Parameter]]:
    """TinyLM's units bottom-up, by hand: embedding and positions, each block, norm and head.

    By default a unit is no larger than the largest block: TinyLM's embedding (512 parameters)
    and positions (1024) are 1536 together, over a block's 1104, so they are two units.
    """
    embed = [*model.embed.parameters(), *model.pos.parameters()]
    return [
        *([embed] if split == "paper" else [[p] for p in embed]),
        *[list(block.parameters()) for block in model.blocks],
        [*model.norm.parameters(), *model.lm_head.parameters()],
    ]


def naive_hift(model, optimizer_cls, kwargs, m, order, batches, split) -> list[float]:
    """Trains ``model`` by HiFT, naively; returns the loss of every step."""
    units = tinylm_units(model, split)
    # bottom-up: consecutive units packed m at a time
    groups = [[p for unit in units[i : i + m] for p in unit] for i in range(0, len(units), m)]
    k = len(groups)
    queue = {
        "bottom2up": list(range(k)),
        "top2down": list(reversed(range(k))),
        "random": group_order(k, "random", SEED),
    }[order]
    optimizers = [optimizer_cls(params, lr=LR, **kwargs) for params in groups]
    losses = []
    for step, ids in enumerate(batches[: CYCLES * k]):
        cycle, position = divmod(step, k)
        active = queue[position]
        for g, params in enumerate(groups):
            for p in params:
                p.requires_grad_(g == active)
        opt = optimizers[active]
        for param_group in opt.param_groups:
            param_group["lr"] = LR * decay(cycle)  # delayed: the same LR for a whole cycle
        loss = lm_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("order", ["bottom2up", "top2down", "random"])
@pytest.mark.parametrize("m", [1, 2, 4])  # m = 4 leaves a short group
@pytest.mark.parametrize("split", list(SPLITS))
def test_hift_optimizer_follows_the_naive_loop(batches, name, order, m, split):
    optimizer_cls, kwargs = OPTIMIZERS[name]
    torch.manual_seed(0)
    model = TinyLM()
    naive_model = copy.deepcopy(model)
    expected_losses = naive_hift(naive_model, optimizer_cls, kwargs, m, order, batches, split)
    k = -(-len(tinylm_units(model, split)) // m)

    config = HiFTConfig(units_per_group=m, order=order, seed=SEED, max_unit_params=SPLITS[split])
    opt = HiFTOptimizer(model, optimizer_cls, config, lr=LR, **kwargs)
    sched = opt.delay(torch.optim.lr_scheduler.LambdaLR(opt, decay))
    assert opt.num_groups == k
    losses = train_steps(model, opt, batches[: CYCLES * k], sched)
    assert opt.cycle == CYCLES

    torch.testing.assert_close(losses, expected_losses)
    expected = snapshot(naive_model)
    for n, p in snapshot(model).items():
        torch.testing.assert_close(p, expected[n], msg=n)
    opt.close()
