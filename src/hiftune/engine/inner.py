"""The per-group inner optimizers: their torch param groups, and their state as flat tensors.

HiFTOptimizer builds one instance of the user's optimizer class per HiFT group. This module holds
what it needs to know about such an instance without touching its code: how to give it per-parameter
options, and how its ``state`` (plus the group's fp32 masters) becomes the flat ``{name: tensor}``
dict a :class:`~hiftune.engine.paging.StateStore` holds, and back. The flat names are
``state.<i>.<key>`` for the state entry ``key`` of the optimizer's i-th parameter, and ``master.<i>``
for the i-th master weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

#: A user's per-parameter options for one group: ``(name, param)`` pairs -> torch param groups.
ParamGroupsFn = Callable[[list[tuple[str, nn.Parameter]]], list[dict[str, Any]]]

Tensors = dict[str, torch.Tensor]


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
