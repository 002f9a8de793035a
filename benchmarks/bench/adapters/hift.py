"""hiftune: HiFT with AdamW through the public API (``HiFTConfig``, ``HiFTOptimizer``, ``delay``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hiftune import HiFTConfig, HiFTOptimizer

from . import LossFn, Trainer


class _HiFTTrainer(Trainer):
    def close(self) -> None:
        assert isinstance(self.optimizer, HiFTOptimizer)
        self.optimizer.close()

    def updated_numel(self) -> int:
        """Elements the next step updates: the active group's (row shards counted as shards) and
        the always-active parameters."""
        opt = self.optimizer
        assert isinstance(opt, HiFTOptimizer)
        if opt.config.precision == "fp32":
            return sum(p.numel() for p in opt.master_parameters())
        # In mixed precision the masters are paged out between steps (empty tensors): count the
        # active model parameters instead (a row-sharded one then counts whole).
        return sum(p.numel() for p in opt.active_parameters())


def build(
    model: nn.Module,
    loss_fn: LossFn,
    lr: float,
    total_steps: int,
    *,
    offload: str = "host",
    precision: str = "fp32",
    units_per_group: int = 1,
    always_active: Sequence[str] = (),
    always_active_lr_scale: float = 1.0,
    steps_per_group: int = 1,
) -> Trainer:
    """HiFT over ``torch.optim.AdamW`` (bottom-up order, the default unit split).

    The learning rate decays linearly over the run counted in cycles of ``steps_per_cycle``
    (k groups times ``steps_per_group``): the scheduler is wrapped with
    :meth:`HiFTOptimizer.delay`, so it advances once per cycle as HiFT prescribes.

    Args:
        units_per_group: m.
        always_active: Regexes of parameters trained at every step (e.g. a new head).
        always_active_lr_scale: Factor on their learning rate.
        steps_per_group: K consecutive steps per group before the next one.

    The three newer options are passed only when they differ from their defaults, so an engine
    without them still runs the paper's schedule.
    """
    extra: dict[str, object] = {}
    if always_active:
        extra["always_active"] = tuple(always_active)
        extra["always_active_lr_scale"] = always_active_lr_scale
    if steps_per_group != 1:
        extra["steps_per_group"] = steps_per_group
    config = HiFTConfig(
        units_per_group=units_per_group,
        offload=offload,  # type: ignore[arg-type]
        precision=precision,  # type: ignore[arg-type]
        **extra,  # type: ignore[arg-type]
    )
    opt = HiFTOptimizer(model, torch.optim.AdamW, config, lr=lr)
    per_cycle = int(getattr(opt, "steps_per_cycle", opt.num_groups))
    cycles = max(1, -(-total_steps // per_cycle))
    sched = opt.delay(torch.optim.lr_scheduler.LambdaLR(opt, lambda c: max(0.0, 1.0 - c / cycles)))
    return _HiFTTrainer(model, loss_fn, opt, sched)
