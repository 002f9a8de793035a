"""Backward truncation: no autograd graph below the lowest block HiFT trains.

Freezing every group but the active one is what truncates backward: with no trainable parameter
below the lowest active block, autograd builds no graph there. Freezing alone stops working as soon
as something makes an activation require grad from below; Hugging Face's gradient checkpointing does
exactly that (``enable_input_require_grads``), so that reentrant checkpoints see a grad-requiring
input. :class:`BackwardTruncation` keeps the cut in place with forward hooks on the blocks.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .split.units import Unit, group_cut

#: The flag Hugging Face blocks carry when gradient checkpointing is on. Read and written by name:
#: it is a plain attribute of some modules, not part of ``nn.Module``.
_CHECKPOINTING = "gradient_checkpointing"


class BackwardTruncation:
    """Keeps autograd from building a graph below the lowest active block.

    Pre-hooks detach the inputs of the blocks that provably run before any parameter of the
    active group is used (the group's :attr:`~hiftune.engine.split.units.Unit.cut`, found by tracing a
    forward pass), and nothing else: a parameter used before the blocks, between two stacks or by
    every block keeps its gradient. When the highest of those blocks is itself active and
    checkpointed, it gets a fresh grad-requiring input so that reentrant checkpointing still
    computes its weight gradients. Frozen blocks below the cut run with checkpointing paused.

    Args:
        model: The model whose blocks get the hooks.
        units: The model's units, bottom-up; their ``module`` paths are its blocks (a block split
            into sub-units is one block).
    """

    def __init__(self, model: nn.Module, units: Iterable[Unit]) -> None:
        blocks = list(dict.fromkeys(u.module for u in units if u.module is not None))
        self._index = {path: i for i, path in enumerate(blocks)}
        self._lowest: int | None = None  # index of the highest block whose inputs are detached
        self._lowest_active = False  # whether that block belongs to the active group
        self._handles: list[RemovableHandle] = []
        for i, path in enumerate(blocks):
            block = model.get_submodule(path)
            self._handles.append(
                block.register_forward_pre_hook(partial(self._hook, i), with_kwargs=True)
            )
            self._handles.append(block.register_forward_hook(self._restore, always_call=True))
        self._paused: dict[int, Any] = {}  # id(block) -> its checkpointing flag

    def set_active(self, units: Iterable[Unit]) -> None:
        """Moves the cut to just below the active group (``units``): see :attr:`Unit.cut`."""
        units = list(units)
        cut = min(group_cut(units), len(self._index))
        self._lowest = cut - 1 if cut > 0 else None
        self._lowest_active = self._lowest is not None and any(
            self._index.get(u.module) == self._lowest for u in units if u.module is not None
        )

    def remove(self) -> None:
        """Removes every hook; the model runs as if HiFT had never touched it."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(
        self, index: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        lowest = self._lowest
        if lowest is None or index > lowest or not torch.is_grad_enabled():
            return None
        args = tuple(_detached(a) for a in args)
        kwargs = {k: _detached(v) for k, v in kwargs.items()}
        checkpointing = getattr(module, _CHECKPOINTING, False)
        active = index == lowest and self._lowest_active
        if not active and checkpointing:
            # A frozen block below the active ones builds no graph, so checkpointing it only
            # costs time (and a "no input requires grad" warning): pause it for this call.
            self._paused[id(module)] = checkpointing
            setattr(module, _CHECKPOINTING, False)
        if active and module.training and checkpointing:
            if args and torch.is_tensor(args[0]) and args[0].is_floating_point():
                args = (args[0].detach().requires_grad_(True), *args[1:])
            elif torch.is_tensor(kwargs.get("hidden_states")):
                kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_(True)
        return args, kwargs

    def _restore(self, module: nn.Module, args: Any, output: Any) -> None:
        if id(module) in self._paused:
            setattr(module, _CHECKPOINTING, self._paused.pop(id(module)))


def _detached(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach() if value.requires_grad else value
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return value
