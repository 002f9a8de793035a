"""HiFT's schedule: which group trains at each step, and what trains at every step.

The paper's schedule trains one group per step and moves to the next group in a fixed order. Two
options change that, both set in :class:`~hiftune.engine.config.HiFTConfig`:

* ``steps_per_group`` (K): each group takes K consecutive steps before the next one becomes
  active, as BAdam switches blocks every K steps. A cycle is then ``k * K`` steps. Each group
  keeps its optimizer state across its visits (paged out between them, as always).
* ``always_active``: parameters trained at every step, beside the active group, by an optimizer of
  their own whose state is never paged. A freshly initialised classification head otherwise learns
  one step in k, while every block below it adapts to a head that barely moves.

:class:`Rotation` is the queue (order, position, steps within the visit, cycles);
:func:`always_active_warnings` says when training some parameters at every step is not cheap.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import HiFTConfig
from ..split.units import Unit, always_active_names, group_units, split_model, unit_numel
from .order import group_order


@dataclass
class Rotation:
    """The queue of groups: a fixed order, ``steps_per_group`` steps per visit.

    Attributes:
        order: Bottom-up group ids in training order.
        steps_per_group: K, the steps of one visit.
        position: Index into ``order`` of the active group.
        group_steps: Steps the active group took in its current visit (``0 <= group_steps < K``).
        cycle: Completed cycles (every group visited once).
        steps: Steps taken in all.
    """

    order: list[int]
    steps_per_group: int = 1
    position: int = 0
    group_steps: int = 0
    cycle: int = 0
    steps: int = 0

    @property
    def active(self) -> int:
        """The bottom-up id of the active group."""
        return self.order[self.position]

    @property
    def steps_per_cycle(self) -> int:
        """``k * K``: the steps of one cycle."""
        return len(self.order) * self.steps_per_group

    def advance(self) -> bool:
        """Counts one step; returns whether the active group changed."""
        self.steps += 1
        self.group_steps += 1
        if self.group_steps < self.steps_per_group:
            return False
        self.group_steps = 0
        self.position = (self.position + 1) % len(self.order)
        if self.position == 0:
            self.cycle += 1
        return True

    def to_meta(self) -> dict[str, Any]:
        """The queue as plain values, for a state dict's ``"hift"`` entry."""
        return {
            "order": list(self.order),
            "position": self.position,
            "group_steps": self.group_steps,
            "cycle": self.cycle,
            "steps": self.steps,
        }

    def load_meta(self, meta: Mapping[str, Any]) -> None:
        """Restores :meth:`to_meta` output (already validated; ``group_steps`` may be absent in a
        state dict from before ``steps_per_group`` existed, where it is 0)."""
        self.order = [int(i) for i in meta["order"]]
        self.position = int(meta["position"])
        self.group_steps = int(meta.get("group_steps", 0))
        self.cycle = int(meta["cycle"])
        self.steps = int(meta["steps"])


@dataclass(frozen=True)
class Split:
    """A model as HiFT trains it: rotating groups of units, and the always-active unit.

    Attributes:
        units: The rotating units, bottom-up.
        groups: The units of each rotating group, bottom-up (group id b is ``groups[b]``).
        always: The always-active unit, or ``None``.
    """

    units: list[Unit]
    groups: list[tuple[Unit, ...]]
    always: Unit | None

    @property
    def every(self) -> list[tuple[Unit, ...]]:
        """Every group's units by id: the rotating ones, then the always-active unit (id k)."""
        return [*self.groups, *([(self.always,)] if self.always is not None else [])]

    def rotation(self, config: HiFTConfig) -> Rotation:
        """A fresh queue over the rotating groups in ``config``'s order."""
        order = group_order(len(self.groups), config.order, config.seed)
        return Rotation(order, config.steps_per_group)


def split_groups(model: nn.Module, config: HiFTConfig) -> Split:
    """Splits ``model`` into units (:func:`~hiftune.engine.split.units.split_model`) and packs the
    rotating ones into groups; warns when the always-active set is not cheap.

    Raises:
        ValueError: As :func:`~hiftune.engine.split.units.split_model` and
            :func:`~hiftune.engine.split.units.group_units`.
    """
    units, always = split_model(model, config)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    sizes = [unit_numel(u, shapes) for u in units]
    groups = group_units(units, config.units_per_group, config.group_by, sizes)
    if always is not None:
        aliases = always_active_names(model, config.always_active)[1]
        for message in always_active_warnings(always, groups, shapes, aliases):
            warnings.warn(message, stacklevel=3)
    return Split(units, groups, always)


def always_active_warnings(
    always: Unit,
    groups: Sequence[Sequence[Unit]],
    shapes: Mapping[str, Sequence[int]],
    aliases: Sequence[str],
) -> list[str]:
    """Why training ``always`` at every step may not be cheap; empty when it is.

    Args:
        always: The always-active unit (see :func:`~hiftune.engine.split.units.split_model`).
        groups: The rotating groups' units.
        shapes: Each parameter's full shape by name.
        aliases: Tied names the patterns matched (see
            :func:`~hiftune.engine.split.units.always_active_names`).
    """
    out = []
    size = unit_numel(always, shapes)
    if aliases:
        out.append(
            f"always_active names tied weight(s) {', '.join(aliases)}: the tied tensor is trained "
            "(and keeps optimizer state on the device) at every step, and where it is also the "
            "input embedding, backward runs through every block at every step"
        )
    largest = max((sum(unit_numel(u, shapes) for u in g) for g in groups), default=0)
    if size > largest:
        out.append(
            f"the always-active parameters ({size:,} parameters) are larger than the largest "
            f"rotating group ({largest:,}): their gradients and optimizer state stay on the "
            "device at every step, so HiFT's memory saving shrinks; keep only a small new head "
            "always active"
        )
    blocks = len({u.module for g in groups for u in g if u.module is not None})
    if not aliases and blocks and always.cut < blocks:
        out.append(
            f"the always-active parameters are used after only {always.cut} of {blocks} blocks: "
            f"backward runs through the {blocks - always.cut} blocks above at every step"
        )
    return out


def updates_per_group(total_steps: int, num_groups: int, steps_per_group: int = 1) -> list[int]:
    """How many optimizer steps each group (in training order) gets in ``total_steps`` steps.

    Step ``t`` (from 0) trains the group at position ``(t // K) % k``: full cycles give every
    group K updates, and the steps left over go to the first groups in order.

    Args:
        total_steps: The run's optimizer steps.
        num_groups: k.
        steps_per_group: K.
    """
    cycle = num_groups * steps_per_group
    full, rest = divmod(max(0, total_steps), cycle)
    return [
        full * steps_per_group + min(steps_per_group, max(0, rest - i * steps_per_group))
        for i in range(num_groups)
    ]


def cycles_in(total_steps: int, num_groups: int, steps_per_group: int = 1) -> int:
    """The cycles a run of ``total_steps`` starts (the last may be partial), at least 1: the
    length of a delayed LR schedule."""
    return max(1, math.ceil(total_steps / (num_groups * steps_per_group)))
