"""Checking a HiFTOptimizer state dict against the optimizer that loads it, before anything changes.

``HiFTOptimizer.load_state_dict`` loads group by group and pages each out before the next; a
mismatch found half-way (a parameter of another shape, the state of another optimizer class, a
queue position past the last group) would leave a half-loaded optimizer and surface as an
``IndexError`` or a ``KeyError: 'momentum'`` steps later. :func:`validate_state_dict` checks the
whole dict first and raises one :class:`ValueError` that says what does not match.

Version 1 state dicts written before the optimizer class and the parameter shapes were recorded
(``"optimizer_class"`` and ``"shapes"`` in the ``"hift"`` entry) still load: those two checks are
skipped for them, the others still apply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .zero import is_placeholder

#: The format of ``HiFTOptimizer.state_dict()``; bumped only when old dicts can no longer load.
STATE_DICT_VERSION = 1

_META_KEYS = ("group_names", "groups", "order", "position", "cycle", "steps", "precision")


@dataclass(frozen=True)
class Layout:
    """What a state dict must match to load into an optimizer (per group: bottom-up ids).

    Attributes:
        names: Parameter names of each group; a row shard's name ends with its rows,
            ``name[start:stop]``, so that a checkpoint of another split does not load.
        group_names: A readable name per group, for messages.
        shapes: The shape of each parameter of each group.
        param_group_sizes: Per group, how many tensors each torch param group of its optimizer has.
        optimizer_class: :func:`class_name` of the per-group optimizers.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        rotating: How many of the groups rotate (the queue's length); the others (the
            always-active parameters') come after them. ``None``: all of them.
        steps_per_group: K, the steps of one visit (a checkpoint saved further into a visit
            does not load).
        foreign: Groups whose state another rank keeps (``shard_state``): for them a
            checkpoint may hold a placeholder (:func:`~hiftune.engine.state.zero.placeholder`).
    """

    names: list[list[str]]
    group_names: list[str]
    shapes: list[list[list[int]]]
    param_group_sizes: list[list[int]]
    optimizer_class: str
    precision: str
    rotating: int | None = None
    steps_per_group: int = 1
    foreign: frozenset[int] = frozenset()

    def to_meta(self) -> dict[str, Any]:
        """The layout's part of a state dict's ``"hift"`` entry (plain values)."""
        return {
            "version": STATE_DICT_VERSION,
            "group_names": list(self.group_names),
            "groups": [list(n) for n in self.names],
            "shapes": [[list(s) for s in g] for g in self.shapes],
            "optimizer_class": self.optimizer_class,
            "precision": self.precision,
        }


def class_name(obj: object) -> str:
    """``module.QualName`` of ``obj``'s class, as recorded in a state dict."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _fail(reason: str) -> ValueError:
    return ValueError(f"cannot load this HiFT state dict: {reason}")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def validate_state_dict(state_dict: object, layout: Layout) -> Mapping[str, Any]:
    """Checks ``state_dict`` against ``layout`` without changing anything.

    Returns:
        The dict's ``"hift"`` entry.

    Raises:
        ValueError: The first mismatch found: not a HiFT state dict, another version, model, unit
            split, parameter shape, optimizer class or precision, a queue position or order that
            does not fit, or a group entry of the wrong form.
    """
    if not isinstance(state_dict, Mapping) or "hift" not in state_dict:
        raise ValueError("not a HiFTOptimizer state dict (no 'hift' entry)")
    meta = state_dict["hift"]
    if not isinstance(meta, Mapping):
        raise _fail("its 'hift' entry is not a dict")
    if meta.get("version") != STATE_DICT_VERSION:
        raise _fail(f"unsupported HiFT state dict version {meta.get('version')!r}")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing or "groups" not in state_dict:
        raise _fail(f"it lacks {', '.join(missing) or 'groups'}")
    k = len(layout.names) if layout.rotating is None else layout.rotating
    if [list(n) for n in meta["groups"]] != layout.names:
        raise ValueError(
            "this checkpoint was saved for a different model or unit split: its groups are "
            f"{meta['group_names']}, this optimizer's are {layout.group_names} (the split "
            "follows HiFTConfig's units_per_group, group_by, max_unit_params, units, blocks and "
            "always_active; a checkpoint from before unit budgets needs max_unit_params=None)"
        )
    _check_shapes(meta.get("shapes"), layout)
    saved_cls = meta.get("optimizer_class")
    if saved_cls is not None and saved_cls != layout.optimizer_class:
        raise _fail(
            f"it holds the state of {saved_cls}, this optimizer steps with {layout.optimizer_class}"
        )
    if meta["precision"] != layout.precision:
        raise ValueError(
            f"this checkpoint was saved with precision={meta['precision']!r}, "
            f"this optimizer uses {layout.precision!r}"
        )
    order = meta["order"]
    if not isinstance(order, Sequence) or sorted(int(i) for i in order) != list(range(k)):
        raise _fail(f"its group order {order!r} is not a permutation of the {k} groups")
    position = meta["position"]
    if not _is_count(position) or position >= k:
        raise _fail(f"its queue position {position!r} is not one of the {k} groups (0..{k - 1})")
    group_steps = meta.get("group_steps", 0)
    if not _is_count(group_steps):
        raise _fail(f"its group_steps count {group_steps!r} is not a non-negative integer")
    if group_steps >= layout.steps_per_group:
        raise _fail(
            f"it was saved {group_steps} steps into a group's visit, more than "
            f"steps_per_group={layout.steps_per_group} allows"
        )
    for key in ("cycle", "steps"):
        if not _is_count(meta[key]):
            raise _fail(f"its {key} count {meta[key]!r} is not a non-negative integer")
    groups = state_dict["groups"]
    if not isinstance(groups, Sequence) or len(groups) != len(layout.names):
        raise _fail(
            f"it holds {len(groups)} group states, this optimizer has {len(layout.names)} groups"
        )
    for b, saved in enumerate(groups):
        _check_group(b, saved, layout)
    return meta


def _check_shapes(shapes: object, layout: Layout) -> None:
    if shapes is None:  # a state dict from before shapes were recorded
        return
    saved = [[list(s) for s in group] for group in shapes]  # type: ignore[attr-defined]
    if [len(g) for g in saved] != [len(g) for g in layout.shapes]:
        raise _fail("its parameter shapes do not match its groups")
    for b, (old, new) in enumerate(zip(saved, layout.shapes, strict=True)):
        for name, s_old, s_new in zip(layout.names[b], old, new, strict=True):
            if s_old != s_new:
                raise _fail(f"parameter {name} has shape {s_old} in it, {s_new} in this model")


def _check_group(b: int, saved: object, layout: Layout) -> None:
    where = f"group {layout.group_names[b]!r}"
    if b in layout.foreign and is_placeholder(saved):
        return  # another rank keeps this group's state; this one has nothing to load
    if not isinstance(saved, Mapping) or not isinstance(saved.get("optimizer"), Mapping):
        raise _fail(f"{where} has no optimizer state")
    inner = saved["optimizer"]
    saved_groups = inner.get("param_groups")
    if not isinstance(saved_groups, Sequence) or not isinstance(inner.get("state"), Mapping):
        raise _fail(f"{where}: its optimizer state is not an optimizer state_dict()")
    sizes = [len(g.get("params", ())) for g in saved_groups]
    if sizes != layout.param_group_sizes[b]:
        raise _fail(
            f"{where}: its optimizer has param groups of sizes {sizes}, this one "
            f"{layout.param_group_sizes[b]} (another param_groups_fn?)"
        )
    n = len(layout.names[b])
    stray = [i for i in inner["state"] if not (isinstance(i, int) and 0 <= i < n)]
    if stray:
        raise _fail(f"{where}: its optimizer state names parameters {stray} it does not have")
    if layout.precision == "fp32":
        return
    masters = saved.get("masters")
    if not isinstance(masters, Sequence) or len(masters) != n:
        raise _fail(f"{where}: it does not hold one fp32 master weight per parameter")
    for name, m, shape in zip(layout.names[b], masters, layout.shapes[b], strict=True):
        if not isinstance(m, torch.Tensor) or list(m.shape) != shape:
            got = list(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise _fail(f"the master weight of {name} is {got} in it, {shape} in this model")
