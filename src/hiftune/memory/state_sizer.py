"""Bytes of optimizer state per parameter, measured from the real optimizer class.

``hiftune estimate`` never looks optimizer state up in a table. Each optimizer is stepped on small
proxy tensors of every parameter rank present in the model; the bytes of state per parameter are
fitted as a polynomial (degree <= 2 in each dimension) of the parameter's shape, checked on one
more shape, and evaluated on the real shapes. This captures Adam's two moments, Adafactor's
factored row/column vectors for matrices (and full second moment for vectors), Adagrad's sum,
scalar step counters, and whatever a user's own optimizer keeps.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from fractions import Fraction
from functools import cache
from typing import Any

import torch
from torch import nn

from ..engine.optimizers import OPTIMIZERS, resolve_optimizer
from ..engine.state.store import tensor_bytes
from ..errors import UserError

logger = logging.getLogger(__name__)

#: Proxy sizes per dimension: three nodes fit a polynomial of degree <= 2 in each dimension
#: exactly (linear: SGD momentum, Adam; sums of dims: Adafactor; squares: Shampoo-like
#: preconditioners). All >= 2 so that no dimension looks like a broadcast dimension.
_NODES = (2, 3, 5)
_MAX_RANK = 5
#: The learning rate the named optimizers are stepped with: the registry leaves it to the caller
#: (Adafactor with ``relative_step=False`` has none of its own); it does not change state sizes.
_PROXY_LR = 1e-3


class StateSizer:
    """Bytes of optimizer state per parameter, as a function of its shape, for one optimizer.

    Built by stepping the real optimizer class twice on small fp32 proxy tensors (on the CPU)
    of each rank, one per point of the grid ``{2, 3, 5}^rank``; the bytes of every tensor the
    optimizer keeps per parameter are interpolated over the grid and checked on one more shape.

    Args:
        optimizer_cls: Any ``torch.optim.Optimizer`` class (or a callable with its signature).
        kwargs: Keyword arguments for ``optimizer_cls``.
        name: Name for error messages.

    Raises:
        UserError: From :meth:`bytes`, if the optimizer cannot be stepped on plain tensors, or its
            state is not a polynomial of degree <= 2 in each dimension of the parameter's shape.
    """

    def __init__(
        self,
        optimizer_cls: Callable[..., torch.optim.Optimizer],
        kwargs: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        self.optimizer_cls = optimizer_cls
        self.kwargs = dict(kwargs or {})
        self.name = name or getattr(optimizer_cls, "__name__", repr(optimizer_cls))
        self._grid: dict[int, dict[tuple[int, ...], int]] = {}
        self._cache: dict[tuple[int, ...], int] = {}

    @classmethod
    def from_name(cls, name: str) -> StateSizer:
        """A sizer for a name of :data:`hiftune.engine.optimizers.OPTIMIZERS` or a class path.

        A named optimizer gets the registry's default arguments (the ones ``train`` and
        ``profile`` use); a dotted class path (e.g. ``"torch.optim.RMSprop"``) its class defaults.

        Raises:
            UserError: If the name is unknown or its class cannot be imported.
        """
        lr = {"lr": _PROXY_LR} if name in OPTIMIZERS else {}
        optimizer_cls, kwargs = resolve_optimizer(name, **lr)
        return cls(optimizer_cls, kwargs, name)

    def bytes(self, shape: Sequence[int]) -> int:
        """Bytes of state the optimizer keeps for one fp32 parameter of ``shape``."""
        shape = tuple(int(d) for d in shape)
        if shape not in self._cache:
            if len(shape) not in self._grid:
                self._fit(len(shape))
            size = _interpolate(self._grid[len(shape)], shape)
            if size.denominator != 1 or size < 0:  # only a fit that passed its check gets here
                raise UserError(
                    f"the state size of {self.name} interpolates to {size} bytes for shape "
                    f"{shape}: not a whole number of bytes"
                )
            self._cache[shape] = int(size)
        return self._cache[shape]

    def _fit(self, rank: int) -> None:
        if rank > _MAX_RANK:
            raise UserError(
                f"cannot size {self.name}'s state for a parameter of rank {rank} (at most "
                f"{_MAX_RANK} is supported)"
            )
        grid = list(itertools.product(_NODES, repeat=rank))
        check = tuple((7, 4, 6, 9, 8)[:rank])
        measured = self._measure([*grid, check])
        self._grid[rank] = {s: measured[i] for i, s in enumerate(grid)}
        predicted = _interpolate(self._grid[rank], check)
        if predicted != measured[-1]:
            raise UserError(
                f"the state of {self.name} is not a polynomial of degree <= 2 in each dimension "
                f"of a rank-{rank} parameter (predicted {predicted} bytes for shape {check}, "
                f"measured {measured[-1]}); hiftune cannot extrapolate it to the real shapes"
            )
        logger.debug("%s: state bytes of rank-%d parameters fitted on %s", self.name, rank, grid)

    def _measure(self, shapes: Sequence[tuple[int, ...]]) -> list[int]:
        gen = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        for p in params:
            # Non-zero, non-uniform gradients: no optimizer may skip a parameter or a branch.
            p.grad = torch.randn(p.shape, generator=gen)
        try:
            opt = self.optimizer_cls(params, **self.kwargs)
            # Two steps: some optimizers create part of their state lazily after the first.
            for _ in range(2):
                opt.step()
        except Exception as e:  # any failure of a third-party class is the user's to see
            raise UserError(
                f"cannot measure the state of {self.name} by stepping it on plain tensors: "
                f"{type(e).__name__}: {e}"
            ) from e
        # Python scalars in the state (e.g. Adafactor's step counter) live on the host and are
        # not counted by tensor_bytes, which is what device memory needs.
        return [tensor_bytes(opt.state.get(p, {})) for p in params]


def _interpolate(grid: dict[tuple[int, ...], int], shape: tuple[int, ...]) -> Fraction:
    """Tensor-product Lagrange interpolation on the ``_NODES`` grid, exact in rationals."""
    if not shape:
        return Fraction(grid[()])
    total = Fraction(0)
    for point, value in grid.items():
        if value == 0:
            continue
        weight = Fraction(1)
        for x, node in zip(shape, point, strict=True):
            weight *= _lagrange(node, x)
        total += weight * value
    return total


@cache
def _lagrange(node: int, x: int) -> Fraction:
    out = Fraction(1)
    for other in _NODES:
        if other != node:
            out *= Fraction(x - other, node - other)
    return out
