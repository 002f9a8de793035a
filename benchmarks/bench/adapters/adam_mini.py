"""Adam-mini (``adam-mini``): one second-moment value per parameter block instead of per weight."""

from __future__ import annotations

from typing import Any

from adam_mini import Adam_mini
from torch import nn

from . import LossFn, Trainer, linear_decay


def build(model: nn.Module, loss_fn: LossFn, lr: float, total_steps: int) -> Trainer:
    """``Adam_mini(named_parameters, dim, n_heads, n_kv_heads)`` from the model's config, as its
    README shows (it finds embeddings, heads and attention blocks by parameter name).

    Its name sets are extended the way its README says to, for one case its defaults get wrong:
    a norm weight whose name contains "embed" or "output" (BERT's ``embeddings.LayerNorm``,
    ``attention.output.LayerNorm``) would take the per-row path meant for matrices and fail on a
    1-D tensor, so norm weights take its plain-Adam path, as biases do.
    """
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
    opt.adam_block_names.add("norm")  # names are lower-cased: LayerNorm, RMSNorm, *_layernorm
    return Trainer(model, loss_fn, opt, linear_decay(opt, total_steps))
