"""Splitting a unit that is over the size budget into sub-units and row shards.

HiFT's peak memory is set by its largest group, and with the paper's split a unit is never smaller
than a layer: on modern models the token embedding or the LM head is several times a block.
:attr:`HiFTConfig.max_unit_params <hiftune.engine.config.HiFTConfig.max_unit_params>` sets a budget
in parameters, and :func:`split_unit` cuts a unit over it into pieces no larger than the budget:

- a **block** into its child modules (attention, MLP, each expert ...), in the order a traced
  forward pass first uses them; a child still over budget into its own children, a module without
  children into its parameters;
- any **other unit** (embedding, head, the gap between two stacks) into its parameters;
- a **parameter** over budget into row shards of (nearly) equal size along its first dimension,
  each within the budget (a row is never cut; a row larger than the budget is a shard of its own).

Consecutive pieces are then packed together, greedily, while they fit the budget; two shards of
one parameter never share a sub-unit.

Names: a sub-unit is named by its parent unit followed by what it holds, relative to the block for
a block's sub-units (``layers.3.self_attn``, ``layers.3.mlp.experts.0``) and by full parameter
name otherwise (``head.model.norm.weight``). A shard adds its rows as a half-open range,
``[start:stop]`` (``layers.3.mlp.down_proj.weight[0:256]``); a unit that holds a single parameter
drops the parameter's name (``embed[0:6144]``). Packed pieces are joined by ``+`` after their
common dotted prefix (``layers.3.input_layernorm+self_attn``, ``layers.3.mlp.experts.0+1+2``);
more than three show the first and the last (``layers.3.mlp.experts.0+...+7``).

Nothing here reads or changes weights; it works on the ``meta`` device.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

#: A piece of a parameter: its name, and its rows ``(start, stop)`` or ``None`` for all of it.
Entry = tuple[str, tuple[int, int] | None]


@dataclass(frozen=True)
class SubUnit:
    """One piece of a split unit.

    Attributes:
        suffix: What to append to the parent unit's name (``".self_attn"``, ``"[0:6144]"``).
        params: The parameter names it holds, in execution order.
        rows: For each sharded parameter it holds, its rows ``(start, stop)``.
    """

    suffix: str
    params: tuple[str, ...]
    rows: Mapping[str, tuple[int, int]]


@dataclass(frozen=True)
class _Piece:
    label: str  # relative to the unit; "" for the unit's only parameter
    entries: tuple[Entry, ...]
    size: int


def row_shards(rows: int, row_numel: int, budget: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of nearly equal row shards of a tensor, each within ``budget``.

    Args:
        rows: The tensor's first dimension.
        row_numel: Elements per row.
        budget: Elements per shard at most (exceeded only by a single row larger than it).
    """
    per_shard = max(1, budget // max(1, row_numel))
    count = math.ceil(rows / per_shard)
    bounds = [i * rows // count for i in range(count + 1)]
    return list(itertools.pairwise(bounds))


def split_unit(
    model: nn.Module,
    params: Sequence[str],
    module: str | None,
    budget: int,
    first_use: Mapping[str, int],
) -> list[SubUnit]:
    """Splits one unit into sub-units of at most ``budget`` parameters (see the module docstring).

    Args:
        model: The model.
        params: The unit's parameter names (as in ``model.named_parameters()``).
        module: Dotted path of the unit's block, or ``None`` for a unit that is not a block.
        budget: Parameters per sub-unit at most.
        first_use: Tick of each parameter's first use in a traced forward pass (may be empty),
            which orders a block's children.

    Returns:
        The sub-units, in order; a single one holding everything if the unit fits the budget.
    """
    named = dict(model.named_parameters())
    shapes = {n: tuple(named[n].shape) for n in params}
    # What the traced pass did not use is never a piece of its own: a group holding only such
    # parameters would leave the loss without a gradient (backward() would raise). It rides,
    # whole, with the last piece.
    used = [n for n in params if n in first_use] if first_use else list(params)
    unused = tuple(n for n in params if n not in set(used))
    if not used or sum(_numel(shapes[n]) for n in used) <= budget:
        return [SubUnit("", tuple(params), {})]
    if module is not None:
        names = {id(named[n]): n for n in used}
        block = model.get_submodule(module)
        pieces = _module_pieces(block, "", names, shapes, budget, first_use, set())
    elif len(used) == 1:
        pieces = _param_pieces(used[0], "", shapes[used[0]], budget)
    else:
        pieces = [p for n in used for p in _param_pieces(n, n, shapes[n], budget)]
    subs = [_sub_unit(pack) for pack in _pack(pieces, budget)]
    if unused:
        last = subs[-1]
        subs[-1] = SubUnit(last.suffix, last.params + unused, last.rows)
    return subs


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _param_pieces(name: str, label: str, shape: tuple[int, ...], budget: int) -> list[_Piece]:
    numel = _numel(shape)
    if numel <= budget or not shape:
        return [_Piece(label, ((name, None),), numel)]
    row = numel // shape[0] if shape[0] else 0
    return [
        _Piece(f"{label}[{a}:{b}]", ((name, (a, b)),), (b - a) * row)
        for a, b in row_shards(shape[0], row, budget)
    ]


def _module_pieces(
    module: nn.Module,
    prefix: str,
    names: Mapping[int, str],
    shapes: Mapping[str, tuple[int, ...]],
    budget: int,
    first_use: Mapping[str, int],
    taken: set[str],
) -> list[_Piece]:
    """Pieces of ``module``: its own parameters and its children, in execution order.

    ``taken`` holds the names already placed, so that a parameter two children share is placed
    once (with the first of them).
    """
    # (first use, label, child module or None for a parameter of ``module`` itself, names held)
    items: list[tuple[float, str, nn.Module | None, list[str]]] = []
    for local, p in module.named_parameters(recurse=False):
        name = names.get(id(p))
        if name is not None and name not in taken:
            taken.add(name)
            items.append((first_use.get(name, math.inf), f"{prefix}{local}", None, [name]))
    for local, sub in module.named_children():
        held = [names[id(p)] for p in sub.parameters() if id(p) in names]
        held = [n for n in held if n not in taken]
        taken.update(held)
        if held:
            start = min(first_use.get(n, math.inf) for n in held)
            items.append((start, f"{prefix}{local}", sub, held))
    # Stable: what the traced pass did not reach keeps its registration order, last.
    items.sort(key=lambda item: item[0])
    pieces: list[_Piece] = []
    for _, label, child, held in items:
        size = sum(_numel(shapes[n]) for n in held)
        if child is None:
            pieces += _param_pieces(held[0], label, shapes[held[0]], budget)
        elif size <= budget:
            pieces.append(_Piece(label, tuple((n, None) for n in held), size))
        else:  # its own parameters and its children, each on its own
            owned = taken - set(held)  # what the child holds is for the child to place
            pieces += _module_pieces(child, f"{label}.", names, shapes, budget, first_use, owned)
    return pieces


def _pack(pieces: Sequence[_Piece], budget: int) -> list[list[_Piece]]:
    """Consecutive pieces together while they fit; never two shards of one parameter."""
    packs: list[list[_Piece]] = []
    size = 0
    for piece in pieces:
        held = {n for p in packs[-1] for n, _ in p.entries} if packs else set()
        if not packs or size + piece.size > budget or held & {n for n, _ in piece.entries}:
            packs.append([])
            size = 0
        packs[-1].append(piece)
        size += piece.size
    return packs


def _sub_unit(pack: Sequence[_Piece]) -> SubUnit:
    params = tuple(n for p in pack for n, _ in p.entries)
    rows = {n: r for p in pack for n, r in p.entries if r is not None}
    label = _join([p.label for p in pack])
    return SubUnit(label if label.startswith("[") else f".{label}", params, rows)


def _join(labels: Sequence[str]) -> str:
    """``a.b.x``, ``a.b.y`` -> ``a.b.x+y`` (siblings); more than three: the first and the last."""
    if len(labels) == 1:
        return labels[0]
    split = [label.split(".") for label in labels]
    head = ""
    if len({len(s) for s in split}) == 1 and len({tuple(s[:-1]) for s in split}) == 1:
        head = ".".join(split[0][:-1])  # siblings: the common parent once
    rests = [label.removeprefix(f"{head}.") if head else label for label in labels]
    if len(rests) > 3:
        rests = [rests[0], "...", rests[-1]]
    return f"{head}.{'+'.join(rests)}" if head else "+".join(rests)
