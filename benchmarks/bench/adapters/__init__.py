"""One module per method family; each exposes ``build(model, loss_fn, lr, total_steps, **options)``.

``build`` wraps the model with the method's own package, exactly as its documentation shows, and
returns a :class:`Trainer` whose :meth:`Trainer.step` runs forward, backward and one optimizer
update on a batch. The workload (random tokens or the sentiment task) only supplies ``loss_fn``.
Families are imported lazily, so a missing package fails only its own configurations.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from types import ModuleType
from typing import Any

import torch
from torch import nn

#: ``loss_fn(model, batch) -> scalar loss``, supplied by the workload.
LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]

#: Family name -> module under ``bench.adapters``.
FAMILIES = ("full", "hift", "lora", "badam", "lomo", "galore", "adam_mini", "apollo", "bnb")


def load(family: str) -> ModuleType:
    """The adapter module of ``family`` (importing it imports the method's package)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    return importlib.import_module(f"bench.adapters.{family}")


class Trainer:
    """A model plus its method's update rule: ``step(batch)`` trains on one batch.

    Args:
        model: The model being trained (possibly wrapped, e.g. a PEFT model).
        loss_fn: Computes the loss of a batch.
        optimizer: The optimizer stepped after each backward pass.
        scheduler: Optional LR scheduler stepped after each optimizer step.
        autocast: Run forward and backward under ``torch.autocast("cpu", bfloat16)``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        autocast: bool = False,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.autocast = autocast

    def _context(self) -> AbstractContextManager[Any]:
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else nullcontext()

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """One training step on ``batch``; returns the loss."""
        assert self.optimizer is not None
        with self._context():
            loss = self.loss_fn(self.model, batch)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def close(self) -> None:
        """Releases what the method holds outside the model (files, hooks)."""

    def updated_numel(self) -> int:
        """How many weight elements the next :meth:`step` updates (for "updates per weight").

        The default is every parameter that requires a gradient now; methods that train a
        subset per step (HiFT, BAdam) switch ``requires_grad`` or override this.
        """
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def linear_decay(optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule every method gets: linear decay from the base LR to 0 over ``total`` steps."""
    total = max(1, total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / total))


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require gradients."""
    return [p for p in model.parameters() if p.requires_grad]
