"""Adam-mini (``adam-mini``): one second-moment value per parameter block instead of per weight."""

from __future__ import annotations

from typing import Any

from adam_mini import Adam_mini
from torch import nn

from . import LossFn, Trainer, linear_decay


def build(model: nn.Module, loss_fn: LossFn, lr: float, total_steps: int) -> Trainer:
    """``Adam_mini(named_parameters, dim, n_heads, n_kv_heads)`` from the model's config, as its
    README shows (it finds embeddings, heads and attention blocks by parameter name)."""
    config: Any = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", 1)
    opt = Adam_mini(
        named_parameters=[(n, p) for n, p in model.named_parameters() if p.requires_grad],
        lr=lr,
        dim=getattr(config, "hidden_size", 1),
        n_heads=heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        verbose=False,
    )
    return Trainer(model, loss_fn, opt, linear_decay(opt, total_steps))
