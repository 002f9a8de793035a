"""The per-group inner optimizers: their torch param groups, and their state as flat tensors.

HiFTOptimizer builds one instance of the user's optimizer class per HiFT group. This module holds
what it needs to know about such an instance without touching its code: how to give it per-parameter
options, and how its ``state`` (plus the group's fp32 masters) becomes the flat ``{name: tensor}``
dict a :class:`~hiftune.engine.state.store.StateStore` holds, and back (:class:`GroupStates` pages every
group's state in and out). The flat names are ``state.<i>.<key>`` for the state entry ``key`` of the
optimizer's i-th parameter, and ``master.<i>`` for the i-th master weight; with compact masters
(:mod:`.compact`) a paged-out master is ``low.<i>`` and ``carry.<i>`` instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from . import compact
from .store import StateStore

logger = logging.getLogger(__name__)

#: A user's per-parameter options for one group: ``(name, param)`` pairs -> torch param groups.
ParamGroupsFn = Callable[[list[tuple[str, nn.Parameter]]], list[dict[str, Any]]]

Tensors = dict[str, torch.Tensor]

#: Per group, the model weight behind each master and the rows of it the master covers (``None``:
#: all of it), in master order: what compact masters are rebuilt from.
Sources = Sequence[Sequence[tuple[nn.Parameter, tuple[int, int] | None]]]


def param_groups(
    named: list[tuple[str, nn.Parameter]],
    step_params: list[nn.Parameter],
    fn: ParamGroupsFn | None,
) -> list[dict[str, Any]]:
    """One HiFT group's torch param groups, over the tensors its optimizer steps on.

    Args:
        named: The group's model parameters with their names.
        step_params: What the optimizer steps on, one per entry of ``named``: the parameters
            themselves, or their fp32 masters in mixed precision.
        fn: The user's ``param_groups_fn``, or ``None`` for one param group.

    Raises:
        ValueError: If ``fn`` does not place every parameter exactly once.
    """
    if fn is None:
        return [{"params": list(step_params)}]
    # In mixed precision the optimizer steps on fp32 masters: map each model parameter to its
    # master, so the user's function can think in model parameters.
    to_step = {id(p): s for (_, p), s in zip(named, step_params, strict=True)}
    groups = []
    placed = 0
    for group in fn(named):
        params = [to_step[id(p)] for p in group["params"]]
        placed += len(params)
        if params:
            groups.append({**group, "params": params})
    if placed != len(named):
        raise ValueError(
            f"param_groups_fn must place each of the {len(named)} parameters it is given exactly "
            f"once; it placed {placed}"
        )
    return groups


def step_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors ``optimizer`` steps on, in its param-group order (the flat names' ``<i>``)."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def flatten_state(
    optimizer: torch.optim.Optimizer, masters: Sequence[nn.Parameter]
) -> tuple[Tensors, dict[str, Any]]:
    """Splits ``optimizer.state`` and the masters' data into flat tensors and plain scalars.

    Returns:
        ``(tensors, scalars)``: what goes to the store, and the non-tensor state entries (an
        Adafactor step count, say), which stay with the caller.
    """
    tensors: Tensors = {}
    scalars: dict[str, Any] = {}
    for i, p in enumerate(step_params(optimizer)):
        for key, value in optimizer.state.get(p, {}).items():
            target = tensors if torch.is_tensor(value) else scalars
            target[f"state.{i}.{key}"] = value
    for i, m in enumerate(masters):
        tensors[f"master.{i}"] = m.data
    return tensors, scalars


def fill_state(
    optimizer: torch.optim.Optimizer,
    masters: Sequence[nn.Parameter],
    tensors: Tensors,
    scalars: dict[str, Any],
) -> None:
    """Puts :func:`flatten_state` output back into ``optimizer.state`` and the masters."""
    params = step_params(optimizer)
    for name, value in {**tensors, **scalars}.items():
        kind, rest = name.split(".", 1)
        if kind == "master":
            masters[int(rest)].data = value
        else:
            index, key = rest.split(".", 1)
            optimizer.state[params[int(index)]][key] = value


def clear_state(optimizer: torch.optim.Optimizer, masters: Sequence[nn.Parameter]) -> None:
    """Drops the optimizer's state and the masters' data (once a store holds them)."""
    optimizer.state.clear()
    for m in masters:
        # Keep the Parameter object (the optimizer's state is keyed by it), drop its data.
        m.data = torch.empty(0, dtype=m.dtype, device=m.device)


class GroupStates:
    """Every group's inner optimizer and fp32 masters, paged in and out of a store by group id.

    A group is *resident* while its state (and masters' data) is in the optimizer; otherwise the
    store holds it as flat tensors, and the non-tensor entries (an Adafactor step count) stay here.

    Args:
        store: Where paged-out groups live.
        names: A readable name per group, for messages.
        pinned: Groups that are never paged out (the always-active parameters').
        sources: Each group's weights behind its masters, to store bf16 masters compactly (see
            :mod:`.compact`): a paged-out master is then the low bits its bf16 weight lacks.
            ``None`` stores masters whole.
    """

    def __init__(
        self,
        store: StateStore,
        names: Sequence[str],
        pinned: Collection[int] = (),
        sources: Sources | None = None,
    ) -> None:
        self.store = store
        self.names = list(names)
        self.pinned = frozenset(pinned)
        self.inner: list[torch.optim.Optimizer] = []
        self.masters: list[list[nn.Parameter]] = []
        self.resident: set[int] = set()
        self._scalars: list[dict[str, Any]] = []
        self._sources = sources
        # Groups whose masters may not round to their weights (loaded from a checkpoint): their
        # next page-out checks each master before storing it compactly.
        self._unchecked: set[int] = set()

    def add(self, optimizer: torch.optim.Optimizer, masters: list[nn.Parameter]) -> None:
        """Adds the next group, resident, and pages it out (some optimizers, e.g. Adagrad,
        create their state in ``__init__``)."""
        self.inner.append(optimizer)
        self.masters.append(masters)
        self._scalars.append({})
        self.resident.add(len(self.inner) - 1)
        self.page_out(len(self.inner) - 1)

    def page_out(self, b: int) -> None:
        """Moves group ``b``'s state to the store (nothing if it is not resident, or pinned).

        Raises:
            BaseException: Whatever the store raised; the group then stays resident, so a failed
                write (a full disk) loses nothing and a later page-out tries again.
        """
        if b not in self.resident or b in self.pinned:
            return
        tensors, scalars = flatten_state(self.inner[b], self.masters[b])
        tensors, checked = self._compact(b, tensors)
        try:
            self.store.put(b, tensors)
        except BaseException:
            logger.warning(
                "could not page out the optimizer state of group %r; it stays in memory",
                self.names[b],
            )
            raise
        self._scalars[b] = scalars
        if checked:
            self._unchecked.discard(b)
        clear_state(self.inner[b], self.masters[b])
        self.resident.discard(b)

    def page_in(self, b: int) -> None:
        """Brings group ``b``'s state back from the store (nothing if it is resident)."""
        if b in self.resident:
            return
        tensors = self._expand(b, self.store.get(b))
        fill_state(self.inner[b], self.masters[b], tensors, self._scalars[b])
        self.resident.add(b)

    def copy(self, b: int, with_masters: bool) -> dict[str, Any]:
        """Group ``b``'s ``{"optimizer": state_dict, "masters": CPU copies or None}``.

        A paged-out group is filled from a CPU copy of the store for the duration of the copy.
        """
        paged_out = b not in self.resident
        inner, masters = self.inner[b], self.masters[b]
        if paged_out:
            fill_state(inner, masters, self._expand(b, self.store.peek(b)), self._scalars[b])
        saved = {
            "optimizer": inner.state_dict(),
            "masters": [m.data.to("cpu") for m in masters] if with_masters else None,
        }
        if paged_out:
            clear_state(inner, masters)
        return saved

    def load(self, b: int, saved: dict[str, Any], device: torch.device) -> None:
        """Replaces group ``b``'s state by a :meth:`copy` of it, then pages it out."""
        if b not in self.pinned:
            self.store.get(b)  # drop what the store holds for this group
        inner = self.inner[b]
        clear_state(inner, self.masters[b])
        inner.load_state_dict(saved["optimizer"])  # casts state to each parameter's device
        if saved.get("masters") is not None:
            for m, data in zip(self.masters[b], saved["masters"], strict=True):
                m.data = data.to(device=device, dtype=torch.float32)
            self._unchecked.add(b)
        self.resident.add(b)
        self.page_out(b)

    def drain(self, skip: int | None = None) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """Each group's fp32 master data, one group at a time, taking it out of the store.

        For handing the masters to the model when closing; a group whose state cannot be read
        (a damaged file) is left out with a warning, as is group ``skip``.
        """
        for b, (inner, masters) in enumerate(zip(self.inner, self.masters, strict=True)):
            if b == skip:
                continue
            if b not in self.resident:
                try:
                    tensors = self._expand(b, self.store.get(b))
                    fill_state(inner, masters, tensors, self._scalars[b])
                except Exception as e:  # a damaged state file must not stop the close
                    logger.warning("group %r keeps its half-precision weights: %s", b, e)
                    continue
            yield b, [m.data for m in masters]
            clear_state(inner, masters)
            self.resident.discard(b)

    def _compact(self, b: int, tensors: Tensors) -> tuple[Tensors, bool]:
        """``tensors`` with each master that allows it replaced by its low bits and carries, and
        whether each master of an unchecked group was found to round to its weight."""
        if self._sources is None:
            return tensors, True
        check = b in self._unchecked
        matched = True
        out = dict(tensors)
        for i, weight in enumerate(_weights(self._sources[b])):
            master = out[f"master.{i}"]
            if not compact.applies(master, weight):
                continue
            if check and not compact.matches(master, weight):
                matched = False  # stored whole until a step writes it into its weight
                continue
            del out[f"master.{i}"]
            out[f"low.{i}"], out[f"carry.{i}"] = compact.split_master(master, weight)
        return out, matched

    def _expand(self, b: int, tensors: Tensors) -> Tensors:
        """Undoes :meth:`_compact`: every master whole again, on the device of its low bits."""
        if self._sources is None or not any(k.startswith("low.") for k in tensors):
            return tensors
        out = dict(tensors)
        for i, weight in enumerate(_weights(self._sources[b])):
            if f"low.{i}" in out:
                low, carry = out.pop(f"low.{i}"), out.pop(f"carry.{i}")
                out[f"master.{i}"] = compact.join_master(weight.to(low.device), low, carry)
        return out


def _weights(sources: Sequence[tuple[nn.Parameter, tuple[int, int] | None]]) -> list[torch.Tensor]:
    # The current data of a group's weights (a row shard's rows), one per master.
    return [w.data if rows is None else w.data[rows[0] : rows[1]] for w, rows in sources]
