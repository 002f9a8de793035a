"""Packing a model's units into HiFT's groups: m consecutive units, or balanced by size.

HiFT trains one group of consecutive units per step. The paper packs ``m`` units per group
(``group_by="count"``); ``group_by="size"`` keeps the same number of groups ``k = ceil(n / m)`` but
moves their boundaries so that the largest group holds as few parameters as the units allow (the
exact linear partition, :func:`balanced_bounds`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .units import Unit

T = TypeVar("T")


def group_units(
    units: Sequence[T],
    units_per_group: int,
    group_by: str = "count",
    sizes: Sequence[int] | None = None,
) -> list[tuple[T, ...]]:
    """Packs consecutive units into ``k = ceil(n / m)`` groups.

    Args:
        units: The units, bottom-up.
        units_per_group: m.
        group_by: ``"count"``: m units per group (the last may hold fewer). ``"size"``: the k
            groups whose largest ``sizes`` sum is as small as possible (:func:`balanced_bounds`).
        sizes: The size of each unit (e.g. :func:`~hiftune.engine.split.units.unit_numel`); needed for
            ``"size"``.

    Raises:
        ValueError: If ``units_per_group`` is below 1 or above the number of units, for an unknown
            ``group_by``, or ``"size"`` without one size per unit.
    """
    n = len(units)
    if not 1 <= units_per_group <= n:
        raise ValueError(
            f"units_per_group must be between 1 and the number of units n={n} of this model, "
            f"got {units_per_group}"
        )
    k = math.ceil(n / units_per_group)
    if group_by == "count":
        bounds = [min(i * units_per_group, n) for i in range(k + 1)]
    elif group_by == "size":
        if sizes is None or len(sizes) != n:
            raise ValueError(f"group_by='size' needs one size per unit ({n}), got {sizes!r}")
        bounds = balanced_bounds(sizes, k)
    else:
        raise ValueError(f"group_by must be one of count, size; got {group_by!r}")
    return [tuple(units[a:b]) for a, b in itertools.pairwise(bounds)]


def balanced_bounds(sizes: Sequence[int], k: int) -> list[int]:
    """Splits ``sizes`` into ``k`` consecutive non-empty runs whose largest sum is smallest.

    The exact linear partition: a binary search on the bound, each candidate checked greedily
    (O(n log sum)). Of the partitions that reach the smallest bound, the one returned fills each
    run as far as the bound allows, from the left, leaving at least one item per later run.

    Args:
        sizes: Non-negative sizes, in order.
        k: The number of runs, ``1 <= k <= len(sizes)``.

    Returns:
        ``k + 1`` boundaries ``0 = b_0 < b_1 < ... < b_k = len(sizes)``: run i is
        ``sizes[b_i:b_{i+1}]``.

    Raises:
        ValueError: If ``k`` is out of range or a size is negative.
    """
    n = len(sizes)
    if not 1 <= k <= n:
        raise ValueError(f"cannot split {n} units into {k} non-empty groups")
    if any(s < 0 for s in sizes):
        raise ValueError(f"sizes must be >= 0, got {list(sizes)}")

    def runs_needed(bound: int) -> int:
        count, total = 1, 0
        for s in sizes:
            if total + s > bound:
                count, total = count + 1, 0
            total += s
        return count

    low, high = max(sizes), sum(sizes)
    while low < high:  # the smallest bound that k runs can keep
        mid = (low + high) // 2
        if runs_needed(mid) <= k:
            high = mid
        else:
            low = mid + 1
    bounds, total = [0], 0
    for i, s in enumerate(sizes):
        to_open = k - len(bounds)  # runs still to open after the current one
        if i > bounds[-1] and (total + s > low or n - i <= to_open):
            bounds.append(i)
            total = 0
        total += s
    bounds.append(n)
    return bounds


def group_cut(units: Sequence[Unit]) -> int:
    """How many blocks run before any parameter of the group ``units`` is used (min of the cuts)."""
    return min((u.cut for u in units), default=0)


def group_name(units: Sequence[Unit]) -> str:
    """A readable name for a group: ``"layers.3"`` or ``"layers.2..layers.4"``."""
    return units[0].name if len(units) == 1 else f"{units[0].name}..{units[-1].name}"
