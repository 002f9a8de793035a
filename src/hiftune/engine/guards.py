"""What makes a HiFTOptimizer refuse to go on, and the one clear error it raises for each.

* :class:`Lifecycle`: closed, taken over by a newer optimizer, or stopped by an fp16 divergence
  (:class:`DivergedError`): stepping, saving or loading says which.
* :class:`Placement`: the model was cast, moved or had its parameters replaced after the optimizer
  was built (``model.half()``, ``model.cuda()``, ``load_state_dict(assign=True)``). The optimizer's
  fp32 masters, optimizer state and row-shard views belong to the tensors it was built on, so
  stepping would fail deep inside torch, or worse, silently train in the wrong precision or train
  tensors the model no longer uses. Checked at every step, before anything changes.
* :data:`NOT_COPYABLE`: a copy or a pickle of the optimizer would not drive any model (its
  freezing, hooks and paged state belong to the original), so :meth:`HiFTOptimizer.__reduce_ex__`
  refuses with this message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import UserError
from .claims import Claim
from .distributed import is_sharded
from .shards import GroupTensors

#: Why ``copy.deepcopy`` / ``pickle`` of a HiFTOptimizer raises ``TypeError``, and what to do.
NOT_COPYABLE = (
    "a HiFTOptimizer cannot be copied or pickled: it drives its model (frozen groups, hooks, "
    "paged state) and a copy would drive none; to carry its state over, save opt.state_dict() "
    "and load_state_dict() it into a HiFTOptimizer built on the model (or on a copy of it)"
)


class DivergedError(UserError, FloatingPointError):
    """Training diverged: the weights went where training cannot go on (beyond what fp16 holds
    here; a non-finite, exploding or dead loss in ``hiftune train``).

    A :class:`~hiftune.errors.UserError`, since the settings (the learning rate, typically) are to
    blame and ``hiftune train`` reports it in one line, and a ``FloatingPointError``.
    """


class Lifecycle:
    """Whether an optimizer may still step, save and load.

    Args:
        claim: The optimizer's claim on its model (superseded when a newer optimizer took over).

    Attributes:
        closed: ``close()`` ran (or a newer optimizer closed it).
        failure: Why the optimizer stopped (an fp16 divergence), until a checkpoint loads.
    """

    def __init__(self, claim: Claim) -> None:
        self.claim = claim
        self.closed = False
        self.failure: str | None = None

    def check(self) -> None:
        """Raises ``RuntimeError`` saying why the optimizer cannot be used, if it cannot."""
        if self.claim.superseded:
            raise RuntimeError(
                "this HiFTOptimizer was closed because a newer HiFTOptimizer took its model over; "
                "step, save and load with the new one"
            )
        if self.closed:
            raise RuntimeError("this HiFTOptimizer is closed")
        if self.failure is not None:
            raise RuntimeError(
                f"this HiFTOptimizer stopped: {self.failure}. Load a checkpoint with "
                "load_state_dict() or build a new optimizer"
            )


class Placement:
    """The model weights each group trains, with the dtype and device the optimizer built for.

    Args:
        model: The driven model.
        tensors: Each group's tensors (bottom-up), after the optimizer cast them (mixed precision).
        precision: The optimizer's ``HiFTConfig.precision``, named in the error.
    """

    def __init__(self, model: nn.Module, tensors: Sequence[GroupTensors], precision: str) -> None:
        self._model = model
        self._precision = precision
        self._mixed = precision != "fp32"
        named = dict(model.named_parameters())
        # One entry per weight (a tied or sharded weight once): (name, weight, dtype, device).
        self._groups = [
            [(n, named[n], named[n].dtype, named[n].device) for n in _distinct(named, t.names)]
            for t in tensors
        ]

    def check(self, groups: Iterable[int]) -> None:
        """Raises ``RuntimeError`` if a weight of ``groups`` is no longer as built.

        Checks the groups the next step updates (every weight of the model in turn, as the groups
        rotate): their weights' dtype and device, and that the model still holds those very
        tensors. A few attribute reads per weight; no device sync.
        """
        for b in groups:
            for name, weight, dtype, device in self._groups[b]:
                if weight.dtype != dtype or weight.device != device:
                    now = f"{_dtype(weight.dtype)} on {weight.device}"
                    built = "fp32 master weights and optimizer state" if self._mixed else "state"
                    raise RuntimeError(
                        f"the model's parameter {name!r} is {now}, but this HiFTOptimizer "
                        f"(precision={self._precision!r}) built its {built} for {_dtype(dtype)} "
                        f"on {device}: {_FIX}"
                    )
                # FSDP2 swaps a DTensor parameter's registration around forward and backward.
                if not is_sharded(weight) and _registered(self._model, name) is not weight:
                    raise RuntimeError(
                        f"the model's parameter {name!r} was replaced by another tensor (e.g. by "
                        "load_state_dict(assign=True), to_empty() or a move to another kind of "
                        f"device); this HiFTOptimizer still trains the old one: {_FIX}"
                    )


_FIX = (
    "build the optimizer after changing the model, or close() this one and build a new one (a "
    "state_dict() saved before the change restores its state)"
)


def _distinct(named: Mapping[str, nn.Parameter], names: Iterable[str]) -> list[str]:
    """The first name of each distinct weight among ``names``."""
    seen: dict[int, str] = {}
    for n in names:
        seen.setdefault(id(named[n]), n)
    return list(seen.values())


def _registered(model: nn.Module, name: str) -> nn.Parameter | None:
    try:
        return model.get_parameter(name)
    except AttributeError:  # no longer a parameter at all
        return None


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
