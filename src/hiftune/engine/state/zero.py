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
micro-batch. A checkpoint gathers every group from its owner to the saving rank only
(:meth:`StateSharding.share`), never a copy per rank.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..distributed import BUCKET_BYTES, buckets
from .store import StateStore, Tensors

__all__ = ["SAVING_RANK", "ShardedStore", "StateSharding"]

#: The rank (in the sharding's process group) that :meth:`StateSharding.share` gathers every
#: group's state to: the one that saves checkpoints (the Trainer's ``should_save`` process).
SAVING_RANK = 0


def placeholder(owner: int) -> dict[str, Any]:
    """The checkpoint entry of a group another rank (``owner``) keeps: no state, only its owner."""
    return {"optimizer": None, "masters": None, "owner": owner}


def is_placeholder(entry: object) -> bool:
    """Whether a checkpoint entry is a :func:`placeholder`."""
    return isinstance(entry, Mapping) and entry.get("optimizer") is None and "owner" in entry


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

    def share(self, b: int, entry: dict[str, Any]) -> dict[str, Any]:
        """Group ``b``'s checkpoint entry as its owner holds it, on the saving rank.

        Every rank calls this for every group in the same order. The owner sends its ``entry``
        to the saving rank (:data:`SAVING_RANK` of :attr:`group`) alone, point to point, so no
        other rank ever holds a copy: the saving rank gets every group, each other rank keeps the
        groups it owns, and a group it neither owns nor saves becomes a :func:`placeholder`.
        Such a dict loads back on the rank that made it (as accelerate's optimizer wrapper does
        with a fresh ``state_dict()``), since that rank keeps no state for the placeholders'
        groups; anywhere else they are refused (resume from the saving rank's checkpoint, on any
        number of ranks).

        Args:
            b: The group (bottom-up).
            entry: This rank's ``{"optimizer": ..., "masters": ...}`` entry for it.
        """
        owner = self.owner(b)
        if self.rank == owner:
            if owner != SAVING_RANK:
                torch.distributed.send_object_list(
                    [entry], self._global(SAVING_RANK), group=self.group
                )
            return entry
        if self.rank == SAVING_RANK:
            box: list[Any] = [None]
            torch.distributed.recv_object_list(box, self._global(owner), group=self.group)
            return box[0]
        return placeholder(owner)

    def _global(self, rank: int) -> int:
        if self.group is None:
            return rank
        return torch.distributed.get_global_rank(self.group, rank)
