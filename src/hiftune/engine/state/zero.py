"""Sharded paged state ("ZeRO for HiFT"): each rank keeps only its share of the groups' state.

In plain data parallelism every rank holds the optimizer state (and fp32 masters) of every group,
N identical copies. HiFT steps one group at a time, which makes an exact sharding cheap: group
``b`` (bottom-up index) is *owned* by rank ``b % N``. Only the owner keeps that group's optimizer
state in its store, only the owner runs the user's optimizer on it, and the owner then broadcasts
the updated weights to the other ranks. Every rank still computes the same averaged gradients
(so gradient clipping and logging see the same norm everywhere), and the weights after a step are
the owner's, bit for bit, on every rank: results equal the unsharded run for any optimizer,
without a line of optimizer-specific code.

Why whole groups and not slices of every group (as ZeRO does)? A slice would need the optimizer to
step a flat slice of a parameter, which elementwise optimizers allow but factored ones (Adafactor,
anything with per-matrix statistics) do not. Whole groups keep "any optimizer, unchanged".
Round-robin ownership spreads consecutive groups (a transformer's blocks are equal in size) evenly;
a model whose embedding or head dominates gets less even shares, reported by
:meth:`StateSharding.owned_bytes`.

Communication per optimizer step, for an active group of P parameters (B bytes): the all-reduce of
its gradients (as in data parallelism, about 2B per rank with a ring) plus one broadcast of its
weights from the owner (about B): 1.5 times data parallelism's traffic, once per step, not per
micro-batch. Checkpoints gather every group from its owner (:meth:`StateSharding.share`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from ..distributed import BUCKET_BYTES, buckets
from .paging import StateStore, Tensors

__all__ = ["ShardedStore", "StateSharding"]

T = TypeVar("T")


class ShardedStore(StateStore):
    """A store that keeps only the groups this rank owns, and forgets the rest.

    Args:
        inner: Where the owned groups' state lives (host, disk, in place).
        owns: Whether this rank owns a group key.
    """

    def __init__(self, inner: StateStore, owns: Callable[[int], bool]) -> None:
        self.inner = inner
        self._owns = owns

    def put(self, key: int, tensors: Tensors) -> None:
        if self._owns(key):
            self.inner.put(key, tensors)
        # Another rank keeps this group's state: the caller drops its references, so it is freed.

    def get(self, key: int) -> Tensors:
        return self.inner.get(key) if self._owns(key) else {}

    def prefetch(self, key: int) -> None:
        if self._owns(key):
            self.inner.prefetch(key)

    def flush(self) -> None:
        self.inner.flush()

    def peek(self, key: int) -> Tensors:
        return self.inner.peek(key) if self._owns(key) else {}

    def __contains__(self, key: int) -> bool:
        return self._owns(key) and key in self.inner

    def resident_bytes(self) -> int:
        return self.inner.resident_bytes()

    def close(self) -> None:
        self.inner.close()


class StateSharding:
    """Which rank owns (keeps the state of, and steps) each group: group ``b`` on rank ``b % N``.

    Args:
        group: The process group to shard over (default: the default group). Ranks are counted in
            it; every rank of it must build the same HiFT groups.
    """

    def __init__(self, group: torch.distributed.ProcessGroup | None = None) -> None:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("sharded HiFT state needs torch.distributed to be initialised")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def owner(self, b: int) -> int:
        """The rank (in :attr:`group`) that owns bottom-up group ``b``."""
        return b % self.world

    def owns(self, b: int) -> bool:
        """Whether this rank owns group ``b``."""
        return self.owner(b) == self.rank

    def wrap(self, store: StateStore) -> ShardedStore:
        """``store``, keeping only the groups this rank owns."""
        return ShardedStore(store, self.owns)

    def owned_bytes(self, sizes: list[int]) -> list[int]:
        """Bytes each rank keeps, given every group's state bytes (bottom-up)."""
        out = [0] * self.world
        for b, n in enumerate(sizes):
            out[self.owner(b)] += n
        return out

    @torch.no_grad()
    def broadcast(self, b: int, params: list[nn.Parameter]) -> None:
        """Sends group ``b``'s weights from its owner to every rank (after the owner's step)."""
        src = self._global(self.owner(b))
        for bucket in buckets(params, BUCKET_BYTES):
            if len(bucket) == 1 and bucket[0].data.is_contiguous():
                torch.distributed.broadcast(bucket[0].data, src, group=self.group)
                continue
            flat = torch.cat([p.data.reshape(-1) for p in bucket])
            torch.distributed.broadcast(flat, src, group=self.group)
            offset = 0
            for p in bucket:
                n = p.numel()
                p.data.copy_(flat[offset : offset + n].view_as(p))
                offset += n

    def share(self, b: int, entry: T) -> T:
        """The owner's ``entry`` (e.g. group ``b``'s state dict), on every rank: a collective."""
        box = [entry if self.owns(b) else None]
        torch.distributed.broadcast_object_list(box, self._global(self.owner(b)), group=self.group)
        return box[0]  # type: ignore[return-value]

    def _global(self, rank: int) -> int:
        if self.group is None:
            return rank
        return torch.distributed.get_global_rank(self.group, rank)
