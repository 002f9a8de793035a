"""The order in which HiFT trains its groups."""

from __future__ import annotations

import random

from ..config import ORDERS


def group_order(num_groups: int, order: str, seed: int = 0) -> list[int]:
    """Returns the training order of ``num_groups`` groups, as indices into the bottom-up groups.

    ``"bottom2up"`` trains the embedding group first and the head group last; ``"top2down"`` is the
    reverse; ``"random"`` shuffles the groups once with ``seed``. The order is then fixed for the
    whole run: HiFT's queue takes the head, trains it and appends it to the tail, so cycle after
    cycle repeats the same order.

    Args:
        num_groups: k, the number of groups (>= 1).
        order: One of ``"bottom2up"``, ``"top2down"``, ``"random"``.
        seed: Seed for ``"random"`` (a private ``random.Random``, so global RNGs are untouched).

    Raises:
        ValueError: For an unknown order or fewer than one group.
    """
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if order == "bottom2up":
        return list(range(num_groups))
    if order == "top2down":
        return list(reversed(range(num_groups)))
    if order == "random":
        ids = list(range(num_groups))
        random.Random(seed).shuffle(ids)
        return ids
    raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
