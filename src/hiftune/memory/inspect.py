"""See HiFT's unit split before training: units, groups in training order, sizes and warnings.

The model is split by the same :func:`hiftune.split_units` / :func:`~hiftune.engine.split.units.group_units`
that training uses (usually on a model built on the ``meta`` device, see
:func:`hiftune.memory.estimate.build_meta_model`), and every figure is read from
``model.named_parameters()``, which lists a tied tensor once.

Besides sizes, :func:`inspect_split` looks for what would make a split train the wrong thing:
a unit holding several blocks, a unit much larger than the median block (usually the vocabulary),
and, with ``check_gradients``, trainable parameters that would get no gradient when their group
trains (:mod:`hiftune.memory.gradient_check`: a dummy forward pass per group, with the engine's
backward truncation set as a training step sets it).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..engine.config import PRECISIONS, HiFTConfig
from ..engine.schedule.order import group_order
from ..engine.split.units import Unit, group_name, group_units, split_units, unit_numel
from ..engine.state.precision import DTYPES
from ..errors import UserError, first_line
from .gradient_check import FULL, check_gradients

#: A unit this many times larger than the median block gets a warning.
LARGE_UNIT_RATIO = 2.0


@dataclass(frozen=True)
class UnitInfo:
    """One unit: its name, block module (if any), trainable parameter count and weight bytes.

    Attributes:
        name: The unit's name (a sub-unit's says what it holds, e.g. ``layers.3.mlp``).
        module: The block it lies in, if any.
        params: Trainable parameters (of a row shard: its rows only).
        bytes: Weight bytes of those parameters in the inspected precision.
        tensors: How many parameter tensors it holds (some of them in part, for a row shard).
        parent: The unit it was split from (``HiFTConfig.max_unit_params``), if any.
        rows: The rows ``[start, stop]`` it holds of each sharded parameter.
    """

    name: str
    module: str | None
    params: int
    bytes: int
    tensors: int
    parent: str | None = None
    rows: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class GroupInfo:
    """One group, at its place in the training order.

    Attributes:
        step: 1-based position in one cycle of the training order.
        index: Position among the groups counted bottom-up (embedding first).
        name: ``"layers.3"`` or ``"layers.2..layers.4"``.
        units: Names of its units, bottom-up.
        params: Trainable parameters (a tied tensor counted once).
        bytes: Weight bytes of those parameters in the inspected precision.
    """

    step: int
    index: int
    name: str
    units: tuple[str, ...]
    params: int
    bytes: int


@dataclass
class Inspection:
    """What :func:`inspect_split` found; ``to_dict()`` is the ``--json`` output."""

    model: str
    precision: str
    bytes_per_param: int
    params: int
    trainable_params: int
    units_per_group: int
    order: str
    units: list[UnitInfo]
    groups: list[GroupInfo]
    peak_group: str
    median_block_params: int | None
    tied: list[list[str]] = field(default_factory=list)
    shared: dict[str, list[str]] = field(default_factory=dict)
    no_gradient: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return asdict(self)


def inspect_split(
    model: nn.Module,
    *,
    name: str | None = None,
    units_per_group: int = 1,
    order: str = "bottom2up",
    seed: int = 0,
    precision: str = "fp32",
    config: HiFTConfig | None = None,
    head: str = "causal-lm",
    check_gradients: bool = True,
) -> Inspection:
    """Describes how HiFT splits ``model`` into units and groups, and what looks wrong.

    Args:
        model: Any ``nn.Module``; ideally on the ``meta`` device. Its ``requires_grad`` flags are
            restored after the gradient check.
        name: The model's name in the report (default: its class name).
        units_per_group: m, units per group.
        order: ``bottom2up``, ``top2down`` or ``random``: the training order of the groups.
        seed: Seed of the ``random`` order.
        precision: ``fp32``, ``bf16`` or ``fp16``: the dtype the byte counts assume.
        config: Unit-split overrides (``units`` / ``blocks``); its m, order and seed are replaced.
        head: A head of :data:`~hiftune.memory.configs.HEADS`: the dummy batch and labels the
            gradient check passes (:func:`~hiftune.memory.batches.dummy_batches`).
        check_gradients: Run the dummy forward pass per group that finds parameters that would
            get no gradient (:mod:`hiftune.memory.gradient_check`).

    Raises:
        UserError: For a bad precision, m or order, or a model the unit split cannot handle.
    """
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    try:  # the engine reports a bad m, order or an unsplittable model as ValueError
        base = (config or HiFTConfig()).to_dict()
        hift = HiFTConfig(
            **{**base, "units_per_group": units_per_group, "order": order, "seed": seed}
        )
        units = split_units(model, hift)
        shapes = {n: p.shape for n, p in model.named_parameters()}
        counts = {u.name: unit_numel(u, shapes) for u in units}
        groups = group_units(units, units_per_group, hift.group_by, list(counts.values()))
        training_order = group_order(len(groups), order, seed)
    except ValueError as e:
        raise UserError(first_line(e)) from None
    named = dict(model.named_parameters())  # a tied tensor once, under its first name
    size = torch.empty((), dtype=DTYPES[precision]).element_size()
    unit_infos = [
        UnitInfo(
            u.name,
            u.module,
            counts[u.name],
            counts[u.name] * size,
            len(u.params),
            u.parent,
            {n: list(r) for n, r in u.rows.items()},
        )
        for u in units
    ]
    group_infos = []
    for step, i in enumerate(training_order, start=1):
        n = sum(counts[u.name] for u in groups[i])
        group_infos.append(
            GroupInfo(step, i, group_name(groups[i]), tuple(u.name for u in groups[i]), n, n * size)
        )
    peak = max(sorted(group_infos, key=lambda g: g.index), key=lambda g: g.params)
    blocks = _block_sizes(model, units)
    median = int(statistics.median(blocks.values())) if blocks else None
    result = Inspection(
        model=name or type(model).__name__,
        precision=precision,
        bytes_per_param=size,
        params=sum(p.numel() for p in named.values()),
        trainable_params=sum(u.params for u in unit_infos),
        units_per_group=units_per_group,
        order=order,
        units=unit_infos,
        groups=group_infos,
        peak_group=peak.name,
        median_block_params=median,
        tied=_tied(model),
    )
    result.warnings += _structure_warnings(model, units, unit_infos, blocks, median)
    if check_gradients:
        _check_gradients(model, units, groups, head, result)
    return result


def _tied(model: nn.Module) -> list[list[str]]:
    """Names of each tensor that appears under more than one name."""
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    return [names for names in by_id.values() if len(names) > 1]


def _block_classes(model: nn.Module, units: Sequence[Unit]) -> set[str]:
    """Class names of the blocks: those the split found, and the model's ``_no_split_modules``."""
    found = {type(model.get_submodule(u.module)).__name__ for u in units if u.module is not None}
    return found | set(getattr(model, "_no_split_modules", None) or ())


def _block_sizes(model: nn.Module, units: Sequence[Unit]) -> dict[str, int]:
    """Dotted path -> parameter count of every block module (outermost ones only)."""
    classes = _block_classes(model, units)
    sizes: dict[str, int] = {}
    for path, module in model.named_modules():
        inside = any(path.startswith(f"{b}.") for b in sizes)
        if type(module).__name__ in classes and path and not inside:
            n = sum(p.numel() for p in module.parameters())
            if n:
                sizes[path] = n
    return sizes


def _structure_warnings(
    model: nn.Module,
    units: Sequence[Unit],
    infos: Sequence[UnitInfo],
    blocks: dict[str, int],
    median: int | None,
) -> list[str]:
    unit_of = {n: u.name for u in units for n in u.params}
    held: dict[str, list[str]] = {}  # unit -> the blocks whose parameters all lie in it
    for path in blocks:
        names = [f"{path}.{n}" for n, _ in model.get_submodule(path).named_parameters()]
        homes = {unit_of[n] for n in names if n in unit_of}
        if len(homes) == 1:
            held.setdefault(homes.pop(), []).append(path)
    out = [
        f"unit {u} holds {len(paths)} blocks ({_preview(paths)}): HiFT trains them in one step"
        for u, paths in held.items()
        if len(paths) > 1
    ]
    if median:
        out += [
            f"unit {i.name} has {_count(i.params)} parameters, {i.params / median:.1f}x the "
            f"median block ({_count(median)}): no group holding it can be smaller"
            for i in infos
            if i.params > LARGE_UNIT_RATIO * median
        ]
    return out


def _check_gradients(
    model: nn.Module,
    units: Sequence[Unit],
    groups: Sequence[tuple[Unit, ...]],
    head: str,
    result: Inspection,
) -> None:
    """Fills ``result.shared`` / ``no_gradient`` and their warnings (see :mod:`.gradient_check`)."""
    try:
        result.shared, result.no_gradient = check_gradients(model, units, groups, head)
    except Exception as e:  # a model that cannot run a dummy batch: say so, keep the rest
        result.warnings.append(f"gradient check skipped: {type(e).__name__}: {first_line(e)}")
        return
    for where, names in result.no_gradient.items():
        if where == FULL:
            why = "even when everything trains (unused by this forward pass)"
        else:
            why = f"when their group {where} trains (backward truncation cuts them off)"
        result.warnings.append(
            f"{len(names)} parameter(s) get no gradient {why}: {_preview(names)}"
        )


def _count(n: int) -> str:
    """``28.31M``, ``2.34k`` or ``16``."""
    return f"{n / 1e6:,.2f}M" if n >= 10**6 else f"{n / 1e3:,.2f}k" if n >= 10**3 else str(n)


def _preview(items: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
