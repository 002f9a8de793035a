"""GaLore (``galore-torch``): Adam on gradients projected to a low-rank subspace."""

from __future__ import annotations

from galore_torch import GaLoreAdamW
from torch import nn

from . import LossFn, Trainer, linear_decay, trainable

#: Modules whose 2-D weights GaLore projects (GaLore's ``torchrun_main.py``: attention and MLP).
TARGETS = ("attn", "attention", "mlp", "intermediate", "output.dense")


def lowrank_groups(model: nn.Module, **group: object) -> list[dict[str, object]]:
    """Two param groups as the GaLore and APOLLO READMEs show: projected 2-D block weights (with
    ``group`` options) and the rest (embeddings, norms, head) trained by plain AdamW."""
    low: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_target = p.dim() == 2 and any(t in name for t in TARGETS) and "embed" not in name
        (low if is_target else rest).append(p)
    return [{"params": rest}, {"params": low, **group}]


def build(
    model: nn.Module,
    loss_fn: LossFn,
    lr: float,
    total_steps: int,
    *,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
) -> Trainer:
    """``GaLoreAdamW`` with the README's settings: rank 128, projection every 200 steps,
    scale 0.25, ``proj_type="std"``."""
    groups = lowrank_groups(
        model, rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type="std"
    )
    if not trainable(model):
        raise ValueError("GaLore needs trainable parameters")
    opt = GaLoreAdamW(groups, lr=lr)
    return Trainer(model, loss_fn, opt, linear_decay(opt, total_steps))
