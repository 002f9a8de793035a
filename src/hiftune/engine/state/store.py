"""The store interface of paged state, the byte counter, sharded tensors, and the in-place store.

A :class:`StateStore` holds the flat ``{name: tensor}`` dicts of inactive groups, keyed by group
index (:mod:`.paging` explains the calls the optimizer makes). Sharded tensors (``DTensor``, e.g.
the optimizer state of an FSDP2 model's parameters) are stored as their local shard and rebuilt on
the way back (:func:`to_local` / :func:`from_local`), so each rank keeps only its own shard.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

Tensors = dict[str, torch.Tensor]


class StateStore(ABC):
    """Holds flat tensor dicts of inactive groups off the training device."""

    @abstractmethod
    def put(self, key: int, tensors: Tensors) -> None:
        """Takes ownership of ``tensors`` (the caller drops its references).

        If ``put`` raises, the store does not hold ``key`` and the caller still owns ``tensors``.
        """

    @abstractmethod
    def get(self, key: int) -> Tensors:
        """Removes ``key`` from the store and returns its tensors, each on the device it had."""

    def prefetch(self, key: int) -> None:  # noqa: B027 - optional hook
        """Starts bringing ``key`` back in the background (a hint; may do nothing)."""

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Waits until every ``put`` and ``prefetch`` so far has finished its background work.

        Afterwards the stored files or copies are complete and :meth:`resident_bytes` no longer
        counts writes in flight. Stores that do nothing in the background need not override it.
        """

    @abstractmethod
    def peek(self, key: int) -> Tensors:
        """Returns a CPU copy (or view) of ``key`` without changing where it lives."""

    @abstractmethod
    def __contains__(self, key: int) -> bool: ...

    @abstractmethod
    def resident_bytes(self) -> int:
        """Bytes of stored tensors held in this process's memory (host or device) right now."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases files and threads; the store is unusable afterwards."""


def tensor_bytes(obj: object) -> int:
    """Bytes of every tensor in ``obj``: a tensor, or dicts, lists and tuples of them (other
    values count 0). The one byte counter of hiftune (paging, the estimator and the profiler).
    A ``DTensor`` counts its local shard: the bytes this process holds."""
    if isinstance(obj, DTensor):
        obj = obj.to_local()
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


@dataclass(frozen=True)
class ShardSpec:
    """What turns a local shard back into its ``DTensor``: mesh, placements, global shape."""

    mesh: Any
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]


def to_local(tensors: Tensors) -> tuple[Tensors, dict[str, ShardSpec]]:
    """Splits ``tensors`` into plain tensors (each ``DTensor`` replaced by its local shard) and the
    :class:`ShardSpec` of every name that was a ``DTensor``."""
    out: Tensors = {}
    specs: dict[str, ShardSpec] = {}
    for name, t in tensors.items():
        if isinstance(t, DTensor):
            specs[name] = ShardSpec(t.device_mesh, tuple(t.placements), t.shape, t.stride())
            out[name] = t.to_local()
        else:
            out[name] = t
    return out, specs


def from_local(tensors: Tensors, specs: dict[str, ShardSpec]) -> Tensors:
    """Undoes :func:`to_local` (no communication: each rank rebuilds its own shard)."""
    if not specs:
        return tensors
    out = dict(tensors)
    for name, spec in specs.items():
        if name in out:
            out[name] = DTensor.from_local(
                out[name],
                spec.mesh,
                spec.placements,
                run_check=False,
                shape=spec.shape,
                stride=spec.stride,
            )
    return out


class KeepStore(StateStore):
    """``offload="none"``: tensors stay where they are (on the training device)."""

    def __init__(self) -> None:
        self._data: dict[int, Tensors] = {}

    def put(self, key: int, tensors: Tensors) -> None:
        self._data[key] = tensors

    def get(self, key: int) -> Tensors:
        return self._data.pop(key, {})

    def peek(self, key: int) -> Tensors:
        return {k: v.detach().to("cpu") for k, v in self._data.get(key, {}).items()}

    def __contains__(self, key: int) -> bool:
        return key in self._data

    def resident_bytes(self) -> int:
        return sum(tensor_bytes(t) for t in self._data.values())
