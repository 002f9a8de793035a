"""Full fine-tuning with ``torch.optim.AdamW``: fp32, or bf16 autocast over fp32 weights."""

from __future__ import annotations

import torch
from torch import nn

from . import LossFn, Trainer, linear_decay, trainable


def build(
    model: nn.Module, loss_fn: LossFn, lr: float, total_steps: int, *, autocast: bool = False
) -> Trainer:
    """Every weight trained by AdamW each step (the baseline every ratio is taken to).

    Args:
        autocast: Forward and backward under ``torch.autocast("cpu", torch.bfloat16)``; weights,
            gradients and Adam state stay fp32 (PyTorch's documented mixed precision).
    """
    opt = torch.optim.AdamW(trainable(model), lr=lr)
    return Trainer(model, loss_fn, opt, linear_decay(opt, total_steps), autocast=autocast)
