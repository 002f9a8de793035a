"""Data parallelism without DDP: averaging the active group's gradients over ranks.

DDP cannot do this for HiFT: it registers its gradient hooks only for the parameters that require
grad when the model is wrapped, and HiFT changes that set every step. The optimizer therefore
averages the active group's gradients itself, once per step, in one flat all-reduce.
"""

from __future__ import annotations

import torch
from torch import nn


def should_sync(sync_gradients: bool | None) -> bool:
    """Whether to average gradients over ranks, for :attr:`HiFTConfig.sync_gradients`.

    ``None`` means: whenever ``torch.distributed`` is initialised with more than one process.
    ``True`` still needs such a process group (with one process there is nothing to average).
    """
    if sync_gradients is False:
        return False
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(params: list[nn.Parameter]) -> None:
    """Averages the gradients of ``params`` over all ranks in one flat all-reduce.

    A rank without a gradient for a parameter contributes zeros, so every rank joins the same
    collective with a tensor of the same size.
    """
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat.div_(torch.distributed.get_world_size())
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g)
        offset += n
