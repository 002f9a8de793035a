"""Taking a model over and handing it back: the per-group optimizers, masters and dtype casts.

:class:`~hiftune.engine.optimizer.HiFTOptimizer` changes a model in three ways while it drives it:
its trainable weights are frozen but for the active group, row shards view some weights, and in
mixed precision every weight is cast to half precision while fp32 masters of each group live in the
store. :class:`Handover` makes those changes group by group and records each one, so that the
model can always be handed back as the user expects:

* after a construction that failed (an optimizer refusing its arguments, say): as it was, each
  weight in its dtype with its exact values, trainable, with no shard views or wrapped forwards;
* by ``close()``: trainable again, each trained weight taking its fp32 master (more precise than
  the half-precision weight trained with), each other weight cast back to its dtype.

Before that, :func:`open_states` sets up where the groups' state will live (the store, sharded over
ranks or not, with compact masters or whole).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .config import HiFTConfig
from .distributed import world_size
from .shards import GroupTensors
from .state import precision
from .state.inner import GroupStates, ParamGroupsFn, param_groups
from .state.paging import make_store
from .state.store import StateStore
from .state.zero import StateSharding

#: A weight (its rows, for a row shard) and the fp32 master data it takes back.
Restore = tuple[nn.Parameter, tuple[int, int] | None, torch.Tensor]


def open_states(
    config: HiFTConfig,
    store: StateStore | None,
    tensors: Sequence[GroupTensors],
    named: Mapping[str, nn.Parameter],
    names: Sequence[str],
    pinned: Sequence[int],
) -> tuple[GroupStates, StateSharding | None]:
    """Where every group's inner optimizer and fp32 masters will live, before they are built.

    Args:
        config: The optimizer's config: its offload, sharding and compact masters.
        store: A store of the user's, or ``None`` for the one ``config.offload`` names.
        tensors: Each group's tensors (bottom-up).
        named: The model's parameters by name.
        names: A readable name per group.
        pinned: Groups whose state is never paged (the always-active one).

    Returns:
        The groups' states, and the sharding of their state over ranks (``shard_state`` on more
        than one process: each rank keeps, and steps, only the groups it owns) or ``None``.
    """
    if store is None:
        store = make_store(config.offload, config.offload_dir)
    sharding = StateSharding() if config.shard_state and world_size() > 1 else None
    if sharding is not None:
        store = sharding.wrap(store)
    sources = None
    if config.compact_masters and config.precision == "bf16":
        # The model weight behind each master: paged-out masters are their low bits.
        sources = [
            [(named[n], rows) for n, rows in zip(t.names, t.rows, strict=True)] for t in tensors
        ]
    return GroupStates(store, list(names), pinned=pinned, sources=sources), sharding


class Handover:
    """Builds each group's optimizer (and masters) on a model, and hands the model back.

    Args:
        model: The model taken over.
        tensors: Each group's tensors (bottom-up), as :meth:`GroupTensors.build` made them.
        states: Where each group's optimizer and masters are kept and paged.
        store: The store behind ``states`` (closed when the model is handed back).
        dtype: The training precision's dtype; ``torch.float32`` means no masters and no casts.
    """

    def __init__(
        self,
        model: nn.Module,
        tensors: Sequence[GroupTensors],
        states: GroupStates,
        store: StateStore,
        dtype: torch.dtype,
    ) -> None:
        self._model = model
        self._named: Mapping[str, nn.Parameter] = dict(model.named_parameters())
        self._tensors = tensors
        self._states = states
        self._store = store
        self._dtype = dtype
        self.mixed = dtype != torch.float32
        # Each parameter cast to half precision, with its dtype before, to restore.
        self._cast: list[tuple[nn.Parameter, torch.dtype]] = []
        # The group whose masters exist but whose optimizer is not built yet.
        self._building: tuple[int, list[nn.Parameter]] | None = None

    def build(
        self,
        optimizer_cls: Callable[..., torch.optim.Optimizer],
        param_groups_fn: ParamGroupsFn | None,
        optimizer_kwargs: dict[str, Any],
    ) -> None:
        """Builds one optimizer per group; undoes everything it did if that fails."""
        try:
            for b, tensors in enumerate(self._tensors):
                self._build_group(b, tensors, optimizer_cls, param_groups_fn, optimizer_kwargs)
            if self.mixed:  # frozen weights too, so every matmul sees one dtype
                precision.cast_to(self._model.parameters(), self._dtype, self._cast)
        except BaseException:
            self._undo()
            raise

    def _build_group(
        self,
        b: int,
        tensors: GroupTensors,
        optimizer_cls: Callable[..., torch.optim.Optimizer],
        param_groups_fn: ParamGroupsFn | None,
        optimizer_kwargs: dict[str, Any],
    ) -> None:
        # One group at a time: build its fp32 masters, cast the model weights to half precision,
        # and page the masters out before the next group, so the device never holds more than
        # one group's masters.
        params = tensors.params
        shards = [s.param for s in tensors.shards]
        masters = (
            precision.make_masters(params, self._dtype, self._cast, shards) if self.mixed else []
        )
        self._building = (b, masters)
        torch_groups = param_groups(
            list(zip(tensors.names, params, strict=True)),
            masters if self.mixed else params,
            param_groups_fn,
        )
        self._states.add(optimizer_cls(torch_groups, **optimizer_kwargs), masters)
        self._building = None
        tensors.deactivate()

    def _undo(self) -> None:
        def masters() -> Iterator[Restore]:
            yield from self.trained_masters()
            if self._building is not None:
                b, data = self._building
                t = self._tensors[b]
                for name, rows, m in zip(t.names, t.rows, data, strict=True):
                    yield self._named[name], rows, m.data

        self.hand_back(masters())

    def hand_back(self, masters: Iterator[Restore] | None = None) -> None:
        """Restores dtypes (the trained weights from ``masters``), trainability, the store.

        Args:
            masters: The fp32 masters the trained weights take (default: every group's, from
                :meth:`trained_masters`).
        """
        try:
            if self.mixed:
                precision.restore_weights(
                    self._cast, masters if masters is not None else self.trained_masters()
                )
        finally:
            for t in self._tensors:
                for w in t.weights:
                    w.requires_grad_(True)
                t.release()  # no view of, or forward over, the model outlives the optimizer
            self._store.close()

    def trained_masters(self, skip: int | None = None) -> Iterator[Restore]:
        """Each trained weight (its rows, for a shard) with its fp32 master data, group by group.

        Args:
            skip: A group whose masters are not taken (a diverged group keeps its last finite
                half-precision weights).
        """
        for b, masters in self._states.drain(skip=skip):
            tensors = self._tensors[b]
            for name, rows, data in zip(tensors.names, tensors.rows, masters, strict=True):
                yield self._named[name], rows, data
