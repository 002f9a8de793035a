"""Hierarchical mixed precision: half-precision weights, fp32 masters for the active group only.

Standard mixed precision keeps an fp32 master copy of *every* weight on the device next to the
half-precision model. HiFT steps one group at a time, so only that group's masters (and optimizer
state) need to be on the device; the rest are paged like optimizer state. This module holds the two
pieces that are specific to precision: the dtype table and the dynamic loss scaler for fp16, plus
the check that fp32 masters still fit the half-precision weights, and handing fp32 weights back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


class LossScaler:
    """Dynamic loss scaling for fp16 training.

    The loss is multiplied by ``scale`` before ``backward`` so that small gradients survive fp16.
    When the gradients of a step contain ``inf`` or ``nan`` the step is skipped (weights and
    optimizer state untouched) and the scale halves; after ``growth_interval`` good steps in a row
    it doubles. Overflowing gradients are never replaced by anything.

    Args:
        init_scale: The initial scale.
        growth_interval: Good steps in a row before the scale doubles.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.scale = float(init_scale)
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.skipped_steps = 0

    def found_overflow(self, grads: Iterable[torch.Tensor]) -> bool:
        """Whether any of ``grads`` holds a non-finite value (one device sync per device)."""
        flags = [torch.logical_not(torch.isfinite(g).all()) for g in grads]
        return bool(torch.stack([f.to(flags[0].device) for f in flags]).any()) if flags else False

    def update(self, overflow: bool) -> None:
        """Adjusts the scale after a step that did (or did not) overflow."""
        if overflow:
            self.scale /= 2.0
            self.good_steps = 0
            self.skipped_steps += 1
            logger.warning(
                "fp16 gradient overflow: step skipped, loss scale lowered to %g", self.scale
            )
        else:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale *= 2.0
                self.good_steps = 0

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state as plain values."""
        return {
            "scale": self.scale,
            "good_steps": self.good_steps,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output."""
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped_steps = int(state["skipped_steps"])


def check_half_range(masters: Sequence[torch.Tensor], dtype: torch.dtype, group: str) -> str | None:
    """Whether fp32 ``masters`` can be copied into ``dtype`` weights without becoming inf.

    A master beyond the half-precision range (fp16: +-65504) or already inf/nan would turn into an
    inf/nan weight on copy-back; with fp16 every later step would then overflow and be skipped,
    forever. One device sync.

    Returns:
        ``None`` if they fit, else why not (naming ``group``), for an error message.
    """
    # max |m| without an |m| copy of each master; nan propagates
    peaks = [torch.linalg.vector_norm(m.detach(), float("inf")) for m in masters if m.numel()]
    if not peaks:
        return None
    peak = float(torch.stack([p.to(peaks[0].device) for p in peaks]).max())
    limit = torch.finfo(dtype).max
    if peak <= limit:  # False for nan too
        return None
    name = str(dtype).removeprefix("torch.")
    return (
        f"training diverged: the step of group {group!r} left fp32 master weights of magnitude "
        f"{peak:.3g}, beyond what {name} weights hold ({limit:g}); lower the learning rate, "
        "clip gradients, or use precision='bf16'"
    )


def restore_weights(
    cast: Sequence[tuple[nn.Parameter, torch.dtype]],
    masters: Iterable[tuple[nn.Parameter, tuple[int, int] | None, torch.Tensor]],
) -> None:
    """Gives parameters mixed precision cast their dtypes back.

    Args:
        cast: Each parameter that was cast to half precision, with its dtype before.
        masters: Trained parameters with the rows their fp32 master covers (``None``: all of
            it, else ``(start, stop)`` of a row shard) and its data, which replaces the (less
            precise) half-precision values. Consumed one at a time, so a generator can bring the
            masters in group by group.

    A weight with row shards keeps its half-precision data until every master is in: compact
    masters (:mod:`.compact`) of its other rows are rebuilt from it, and its dtype before (fp16,
    say) may not hold bf16 values exactly.
    """
    dtypes = {id(p): dtype for p, dtype in cast}
    done: set[int] = set()
    # id -> (a row-sharded parameter, its new data so far)
    sharded: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    try:
        for p, rows, data in masters:
            if rows is None:
                p.data = data.to(dtypes.get(id(p), torch.float32))
            else:
                if id(p) not in sharded:  # the whole weight in its dtype, then its rows
                    sharded[id(p)] = (p, p.data.to(dtypes.get(id(p), p.dtype)))
                sharded[id(p)][1][rows[0] : rows[1]].copy_(data)
            done.add(id(p))
    finally:
        for p, new in sharded.values():
            p.data = new
    for p, dtype in cast:
        if id(p) not in done:
            p.data = p.data.to(dtype)


def make_masters(
    params: Sequence[nn.Parameter],
    dtype: torch.dtype,
    cast: list[tuple[nn.Parameter, torch.dtype]],
    shards: Sequence[nn.Parameter] = (),
) -> list[nn.Parameter]:
    """fp32 master copies of ``params``, which are then cast to ``dtype`` in place.

    Each cast parameter is appended to ``cast`` with its dtype before, for :func:`restore_weights`.
    Row shards among ``params`` (views of some rows of a weight, see :mod:`..shards`) get a master
    of their rows but are not cast: their weight is cast whole, with the frozen parameters.
    """
    masters = [nn.Parameter(p.detach().to(torch.float32, copy=True)) for p in params]
    skip = {id(s) for s in shards}
    for p in params:
        if id(p) in skip:
            continue
        # Recorded even when already in ``dtype``: restore_weights gives a trained parameter its
        # master in the dtype it had, and must not take a bf16 model's weights to fp32.
        cast.append((p, p.dtype))
        p.data = p.data.to(dtype)
    return masters


def cast_to(
    params: Iterable[nn.Parameter], dtype: torch.dtype, cast: list[tuple[nn.Parameter, torch.dtype]]
) -> None:
    """Casts the floating-point ``params`` not yet in ``dtype``, recording each in ``cast``."""
    for p in params:
        if p.is_floating_point() and p.dtype != dtype:
            cast.append((p, p.dtype))
            p.data = p.data.to(dtype)


def grads_to_masters(
    params: Sequence[nn.Parameter], masters: Sequence[nn.Parameter], loss_scale: float
) -> None:
    """Moves the half-precision gradients of ``params`` into their fp32 ``masters``, unscaled."""
    inv = 1.0 / loss_scale
    for p, m in zip(params, masters, strict=True):
        if p.grad is None:
            m.grad = None
            continue
        m.grad = p.grad.detach().to(torch.float32)
        p.grad = None  # the half-precision gradient is no longer needed
        if inv != 1.0:
            m.grad.mul_(inv)
