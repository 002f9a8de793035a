"""Row shards: training some rows of a parameter with any optimizer, unchanged.

A unit may hold only some rows of a parameter (a token embedding or LM head split by
:attr:`HiFTConfig.max_unit_params <hiftune.engine.config.HiFTConfig.max_unit_params>`). The
optimizer of its group must then step those rows only, keep state for those rows only and, in
mixed precision, keep fp32 masters for those rows only, without any optimizer-specific code.

A :class:`RowShard` is a plain ``nn.Parameter`` whose data is a *view* of the rows of the real
weight, so the group's optimizer steps it like any parameter and its in-place update lands in the
weight. The shard is never registered in the model: ``model.state_dict()`` and
``save_pretrained`` see the real weight only, and a tied weight stays one tensor.

The cost of a sharded step: autograd computes gradients for whole tensors. Where the weight's own
modules look it up or multiply by it (``F.embedding`` / ``F.linear``: token embeddings and LM
heads, tied or not), :mod:`.rowgrad` computes the gradient of the active rows only. Any other use
of the weight gives it a **full-size gradient** in the model's dtype, which exists transiently, from
the backward pass until :func:`take_grads` adds the shard's rows to the shard's gradient and drops
it (before the optimizer step, and before paged-out state comes back unless a prefetch brought it
earlier). Optimizer state and fp32 masters exist for the shard's rows only.

While its group is inactive a shard holds no data (an empty tensor of the weight's dtype and
device): the view is made again by :meth:`RowShard.attach` when the group becomes active, since the
weight's ``.data`` may have been replaced in between (mixed precision casts it, ``close()`` gives it
its dtype back).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .rowgrad import RowGradients
from .split.units import Unit


class RowShard:
    """Rows ``start:stop`` (first dimension) of ``weight``, as a parameter of their own.

    Args:
        weight: The model's parameter.
        start: First row.
        stop: One past the last row.

    Attributes:
        param: The ``nn.Parameter`` the group's optimizer steps: a view of the rows while the
            group is active, an empty tensor otherwise. Its ``.grad`` is the rows of the weight's
            gradient once :func:`take_grads` ran.
    """

    def __init__(self, weight: nn.Parameter, start: int, stop: int) -> None:
        self.weight = weight
        self.start = start
        self.stop = stop
        self.param = nn.Parameter(weight.detach()[start:stop])

    @property
    def label(self) -> str:
        """``[start:stop]``, appended to the weight's name in messages and checkpoints."""
        return f"[{self.start}:{self.stop}]"

    @property
    def shape(self) -> list[int]:
        """The shape of the rows."""
        return [self.stop - self.start, *self.weight.shape[1:]]

    def attach(self) -> None:
        """Points the shard at the weight's current rows (its data may have been replaced)."""
        self.param.data = self.weight.data[self.start : self.stop]

    def release(self) -> None:
        """Drops the view and the gradient (the group is inactive)."""
        self.param.grad = None
        self.param.data = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)

    def write_back(self) -> None:
        """Copies the shard into the weight's rows, if an optimizer replaced the view's data.

        Stepping in place (what torch's optimizers do) writes the rows through the view already.
        """
        rows = self.weight.data[self.start : self.stop]
        if self.param.data.data_ptr() != rows.data_ptr():
            rows.copy_(self.param.data)


def take_grads(shards: Sequence[RowShard]) -> None:
    """Adds each shard's rows of its weight's gradient to the shard's, then drops the full-size
    gradients.

    A shard's gradient comes from :mod:`.rowgrad` (``F.embedding`` / ``F.linear`` in the
    weight's own modules), from the weight's full-size gradient (any other use), or both. The rows are copied,
    so that the weight's full gradient (as large as the whole weight) is freed before the optimizer
    step allocates anything. A shard that got neither keeps no gradient.
    """
    for s in shards:
        grad = s.weight.grad
        if grad is None:
            continue
        rows = grad[s.start : s.stop]
        s.param.grad = rows.clone() if s.param.grad is None else s.param.grad.add_(rows)
    for s in shards:
        s.weight.grad = None


@dataclass
class GroupTensors:
    """The tensors of one HiFT group, one entry per (unit, parameter) it trains.

    Attributes:
        names: The parameter name of each entry.
        params: What each entry steps in the model's dtype: the parameter itself, or its
            :class:`RowShard`'s ``param``.
        shards: The row shards among the entries.
        weights: The model parameters the group trains, each once (a sharded one whole): they
            require grad while the group is active.
        labels: Each entry's name, with ``[start:stop]`` for a shard (checkpoint layouts).
        shapes: Each entry's shape (a shard's: its rows).
        rows: Each entry's rows, or ``None`` for a whole parameter.
        row_gradients: Routes the modules using the sharded weights through :mod:`.rowgrad`
            while the group is active.
    """

    names: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)
    shards: list[RowShard] = field(default_factory=list)
    weights: list[nn.Parameter] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    shapes: list[list[int]] = field(default_factory=list)
    rows: list[tuple[int, int] | None] = field(default_factory=list)
    row_gradients: RowGradients | None = None

    @classmethod
    def build(
        cls,
        named: Mapping[str, nn.Parameter],
        units: Iterable[Unit],
        owners: dict[int, list[nn.Module]] | None = None,
    ) -> GroupTensors:
        """The tensors of the group of ``units`` of a model whose parameters are ``named``.

        Args:
            named: The model's parameters by name.
            units: The group's units.
            owners: :func:`~.rowgrad.row_gradient_owners` of the model; ``None``: every sharded
                weight gets its full-size gradient.
        """
        out = cls()
        seen: set[int] = set()
        for u in units:
            for name in u.params:
                weight = named[name]
                rows = u.rows.get(name)
                if rows is None:
                    step, label, shape = weight, name, list(weight.shape)
                else:
                    shard = RowShard(weight, *rows)
                    out.shards.append(shard)
                    step, label, shape = shard.param, name + shard.label, shard.shape
                out.names.append(name)
                out.params.append(step)
                out.labels.append(label)
                out.shapes.append(shape)
                out.rows.append(rows)
                if id(weight) not in seen:
                    seen.add(id(weight))
                    out.weights.append(weight)
        if out.shards and owners:
            out.row_gradients = RowGradients(owners, out.shards)
        return out

    def activate(self) -> None:
        """Makes the group trainable: its weights require grad, its shards view their rows."""
        for w in self.weights:
            w.requires_grad_(True)
        for s in self.shards:
            s.attach()
        if self.row_gradients is not None:
            self.row_gradients.install()

    def write_back(self, masters: Sequence[nn.Parameter]) -> None:
        """Puts the stepped values into the model: the fp32 ``masters`` (one per entry) into the
        half-precision weights, or (no masters, fp32) what a shard's optimizer did not write
        through its view."""
        if masters:
            for p, m in zip(self.params, masters, strict=True):
                p.data.copy_(m.data)  # a row shard's data views the weight's rows
        else:
            for shard in self.shards:
                shard.write_back()

    def deactivate(self) -> None:
        """Freezes the group and drops its gradients and shard views."""
        for w in self.weights:
            w.requires_grad_(False)
            w.grad = None
        for p in self.params:
            p.grad = None
        self.release()

    def release(self) -> None:
        """Drops the shards' views of the weights and gives the modules their forward back."""
        if self.row_gradients is not None:
            self.row_gradients.remove()
        for s in self.shards:
            s.release()
