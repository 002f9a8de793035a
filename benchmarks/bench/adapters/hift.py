"""hiftune: HiFT with AdamW through the public API (``HiFTConfig``, ``HiFTOptimizer``, ``delay``)."""

from __future__ import annotations

import torch
from torch import nn

from hiftune import HiFTConfig, HiFTOptimizer

from . import LossFn, Trainer


class _HiFTTrainer(Trainer):
    def close(self) -> None:
        assert isinstance(self.optimizer, HiFTOptimizer)
        self.optimizer.close()


def build(
    model: nn.Module,
    loss_fn: LossFn,
    lr: float,
    total_steps: int,
    *,
    offload: str = "host",
    precision: str = "fp32",
    units_per_group: int = 1,
) -> Trainer:
    """HiFT over ``torch.optim.AdamW`` with the default split (one unit per group, bottom-up).

    The learning rate decays linearly over the run counted in cycles: the scheduler is wrapped
    with :meth:`HiFTOptimizer.delay`, so it advances once per cycle as HiFT prescribes.
    """
    config = HiFTConfig(
        units_per_group=units_per_group,
        offload=offload,  # type: ignore[arg-type]
        precision=precision,  # type: ignore[arg-type]
    )
    opt = HiFTOptimizer(model, torch.optim.AdamW, config, lr=lr)
    cycles = max(1, -(-total_steps // opt.num_groups))
    sched = opt.delay(torch.optim.lr_scheduler.LambdaLR(opt, lambda c: max(0.0, 1.0 - c / cycles)))
    return _HiFTTrainer(model, loss_fn, opt, sched)
