"""APOLLO (``apollo-torch``): AdamW-like scaling estimated in a random low-rank space.

``apollo-torch`` is licensed CC-BY-NC: it is used here to benchmark, never as a dependency of
hiftune (it appears only in ``benchmarks/requirements-bench.txt``).
"""

from __future__ import annotations

from apollo_torch import APOLLOAdamW
from torch import nn

from . import LossFn, Trainer, linear_decay
from .galore import lowrank_groups


def build(
    model: nn.Module,
    loss_fn: LossFn,
    lr: float,
    total_steps: int,
    *,
    rank: int = 256,
    scale_type: str = "channel",
    scale: float = 1.0,
    update_proj_gap: int = 200,
) -> Trainer:
    """``APOLLOAdamW`` with the README's APOLLO settings (rank 256, random projection,
    channel-wise scaling, scale 1, new projection every 200 steps); ``rank=1`` with
    ``scale_type="tensor"`` and ``scale=128`` is APOLLO-Mini."""
    groups = lowrank_groups(
        model,
        rank=rank,
        proj="random",
        scale_type=scale_type,
        scale=scale,
        update_proj_gap=update_proj_gap,
        proj_type="std",
    )
    opt = APOLLOAdamW(groups, lr=lr)
    return Trainer(model, loss_fn, opt, linear_decay(opt, total_steps))
