"""LoRA from ``peft``: adapters on every linear layer of the blocks, base weights frozen."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from . import LossFn, Trainer, linear_decay, trainable


def build(
    model: nn.Module,
    loss_fn: LossFn,
    lr: float,
    total_steps: int,
    *,
    rank: int = 8,
    task_type: str = "CAUSAL_LM",
) -> Trainer:
    """``get_peft_model`` with ``target_modules="all-linear"`` and ``lora_alpha = 2 * rank``.

    ``all-linear`` is PEFT's shorthand for every linear layer except the output head. For a
    sequence classifier (``task_type="SEQ_CLS"``) PEFT also trains the new classification head.
    A bf16 base model keeps its adapters in fp32 (PEFT's default ``autocast_adapter_dtype``).
    """
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type=task_type
    )
    peft_model = get_peft_model(model, config)
    opt = torch.optim.AdamW(trainable(peft_model), lr=lr)
    return Trainer(peft_model, loss_fn, opt, linear_decay(opt, total_steps))
