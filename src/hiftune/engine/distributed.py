"""Data parallelism without DDP: averaging the active group's gradients over ranks.

DDP cannot do this for HiFT: it registers its gradient hooks only for the parameters that require
grad when the model is wrapped, and HiFT changes that set every step. The optimizer therefore
averages the active group's gradients itself, once per optimizer step (after gradient
accumulation), in a few flat all-reduces. Parameters sharded by FSDP2 (``DTensor`` parameters of
``torch.distributed.fsdp.fully_shard`` modules) are left alone: FSDP2 already reduce-scatters their
gradients in backward, averaged over the ranks of their mesh.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

#: Gradients smaller than this are averaged together, in flat buffers of at most this size (fewer
#: collectives); larger ones in place, one collective each. So averaging a group costs at most
#: this much memory on top of its gradients, where one flat buffer would double them.
BUCKET_BYTES = 2**20


def should_sync(sync_gradients: bool | None) -> bool:
    """Whether to average gradients over ranks, for :attr:`HiFTConfig.sync_gradients`.

    ``None`` means: whenever ``torch.distributed`` is initialised with more than one process.
    ``True`` still needs such a process group (with one process there is nothing to average).
    """
    if sync_gradients is False:
        return False
    return world_size() > 1


def world_size() -> int:
    """The number of processes of the default process group (1 if there is none)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 shard, or any other distributed tensor)."""
    return isinstance(t, DTensor) or isinstance(getattr(t, "data", None), DTensor)


def all_reduce_mean(params: list[nn.Parameter], bucket_bytes: int = BUCKET_BYTES) -> None:
    """Averages the gradients of ``params`` over all ranks, in place or in small flat buffers.

    A rank without a gradient for a parameter contributes zeros, so every rank joins the same
    collectives with tensors of the same sizes (every rank passes the same ``params``). Sharded
    (``DTensor``) parameters are skipped: their owner (FSDP2) has reduced their gradients already.
    Half-precision gradients (fp16, bf16) are summed and divided in fp32, then rounded once (as
    DDP reduces the fp32 gradients of autocast training): summed in their own dtype, fp16 sums
    would overflow N times sooner than each rank's gradient, and bf16 sums round at every
    addition. fp32 gradients are summed, then divided, as before. Gradients are
    averaged in place, so the peak memory of a step grows by at most ``bucket_bytes`` (counted in
    the dtype of the reduction), not by a second copy of the group's gradients.
    """
    plain = [p for p in params if not is_sharded(p)]
    if not plain:
        return
    world = torch.distributed.get_world_size()
    for bucket in buckets(plain, bucket_bytes, reduce_dtype=reduce_dtype):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
        wire = reduce_dtype(grads[0].dtype)
        if len(bucket) == 1 and wire == grads[0].dtype:
            # One large gradient in its own dtype: reduced in place (a copy only if strided).
            flat = grads[0] if grads[0].is_contiguous() else grads[0].contiguous()
            torch.distributed.all_reduce(flat)
            flat.div_(world)
            if flat is not grads[0]:
                grads[0].copy_(flat)
        elif len(bucket) == 1:
            _mean_in_chunks(grads[0], wire, world, bucket_bytes)
        else:
            # Several small gradients: one flat buffer, cast to the reduction dtype on the way in.
            flat = torch.empty(sum(g.numel() for g in grads), dtype=wire, device=grads[0].device)
            offset = 0
            for g in grads:
                flat[offset : offset + g.numel()].view_as(g).copy_(g)
                offset += g.numel()
            torch.distributed.all_reduce(flat)
            flat.div_(world)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        for p, g in zip(bucket, grads, strict=True):
            p.grad = g


def reduce_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gradients of ``dtype`` are summed in: fp32 for half precision, else their own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _mean_in_chunks(grad: torch.Tensor, wire: torch.dtype, world: int, chunk_bytes: int) -> None:
    # A half-precision gradient larger than a bucket: averaged in ``wire`` a slice at a time, so
    # the fp32 buffer stays within chunk_bytes instead of doubling the gradient's memory.
    flat = grad if grad.is_contiguous() else grad.contiguous()
    view = flat.view(-1)
    step = max(1, chunk_bytes // wire.itemsize)
    for start in range(0, view.numel(), step):
        part = view[start : start + step]
        buffer = part.to(wire)
        torch.distributed.all_reduce(buffer)
        buffer.div_(world)
        part.copy_(buffer)
    if flat is not grad:
        grad.copy_(flat)


def buckets(
    params: list[nn.Parameter],
    bucket_bytes: int,
    reduce_dtype: Callable[[torch.dtype], torch.dtype] | None = None,
) -> Iterator[list[nn.Parameter]]:
    """``params`` in runs for one flat buffer each: one dtype and device per run, at most
    ``bucket_bytes`` (a larger tensor is a run alone), in parameter order, so that every rank
    builds the same runs from the same parameters.

    Args:
        params: The parameters, in the same order on every rank.
        bucket_bytes: The most bytes of one run.
        reduce_dtype: The dtype a parameter's buffer holds, if not its own (sizes count in it).
    """
    by_kind: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
    for p in params:
        by_kind.setdefault((p.dtype, p.device), []).append(p)
    for same in by_kind.values():
        bucket: list[nn.Parameter] = []
        size = 0
        for p in same:
            n = p.numel() * (p.dtype if reduce_dtype is None else reduce_dtype(p.dtype)).itemsize
            if bucket and size + n > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append(p)
            size += n
        if bucket:
            yield bucket
