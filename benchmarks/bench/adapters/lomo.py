"""LOMO (``lomo-optim``): SGD fused into backward, so no gradient of the whole model is kept."""

from __future__ import annotations

import torch
from lomo_optim import Lomo
from torch import nn

from . import LossFn, Trainer, trainable


class _LomoTrainer(Trainer):
    def __init__(self, model: nn.Module, loss_fn: LossFn, lr: float, total_steps: int) -> None:
        super().__init__(model, loss_fn)
        self.lomo = Lomo(model, lr=lr)
        self.base_lr = lr
        self.total = max(1, total_steps)
        self.steps = 0

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        loss = self.loss_fn(self.model, batch)
        # Lomo takes the learning rate with every call; the same linear decay as the others.
        lr = self.base_lr * max(0.0, 1.0 - self.steps / self.total)
        self.lomo.fused_backward(loss, lr)
        self.steps += 1
        return float(loss.detach())


def build(model: nn.Module, loss_fn: LossFn, lr: float, total_steps: int) -> Trainer:
    """``Lomo(model, lr)`` then ``fused_backward(loss, lr)`` per step (no gradient clipping:
    LOMO's default, which avoids its second backward pass)."""
    if not trainable(model):
        raise ValueError("LOMO needs trainable parameters")
    return _LomoTrainer(model, loss_fn, lr, total_steps)
