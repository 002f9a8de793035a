"""8-bit AdamW from ``bitsandbytes`` (block-wise quantized Adam state), on its CPU backend."""

from __future__ import annotations

import bitsandbytes as bnb
from torch import nn

from . import LossFn, Trainer, linear_decay, trainable


def build(model: nn.Module, loss_fn: LossFn, lr: float, total_steps: int) -> Trainer:
    """``bnb.optim.AdamW8bit`` over every weight, as a drop-in replacement for AdamW."""
    opt = bnb.optim.AdamW8bit(trainable(model), lr=lr)
    return Trainer(model, loss_fn, opt, linear_decay(opt, total_steps))
