"""A HiFTOptimizer's checkpoint: what its ``state_dict()`` holds, and loading one back.

The state dict holds only tensors and plain values (safe for ``torch.load(weights_only=True)``):
the layout that a checkpoint must match (:class:`~.state.state_dict.Layout`), the queue
(:class:`~.schedule.rotation.Rotation`), the fp16 loss scaler, and per group its inner optimizer's
``state_dict()`` plus its fp32 masters. Paged-out state is read back to CPU one group at a time.
Loading checks the whole dict first (:func:`~.state.state_dict.validate_state_dict`), so a
mismatch changes nothing.
"""

from __future__ import annotations

from typing import Any

from .schedule.rotation import Rotation
from .shards import GroupTensors
from .state.inner import GroupStates
from .state.precision import LossScaler
from .state.state_dict import Layout, class_name, validate_state_dict
from .state.zero import StateSharding, is_placeholder


class Checkpoint:
    """Saves and restores every group's state, the queue and the loss scaler of an optimizer.

    Args:
        tensors: Each group's tensors (bottom-up).
        states: Each group's inner optimizer and masters (built).
        rotation: The queue.
        group_names: A readable name per group, for messages.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        scaler: The fp16 loss scaler, or ``None``.
        sharding: Which rank keeps each group's state (``shard_state``), or ``None``.
        always: The id of the always-active group (kept by every rank), or ``None``.

    Attributes:
        layout: What a checkpoint must match to load (also recorded in :meth:`save`'s output).
    """

    def __init__(
        self,
        tensors: list[GroupTensors],
        states: GroupStates,
        rotation: Rotation,
        *,
        group_names: list[str],
        precision: str,
        scaler: LossScaler | None,
        sharding: StateSharding | None,
        always: int | None,
    ) -> None:
        rotating = len(rotation.order)
        self.layout = Layout(
            names=[t.labels for t in tensors],
            group_names=list(group_names),
            shapes=[t.shapes for t in tensors],
            param_group_sizes=[[len(g["params"]) for g in i.param_groups] for i in states.inner],
            optimizer_class=class_name(states.inner[0]),
            precision=precision,
            rotating=rotating,
            steps_per_group=rotation.steps_per_group,
            foreign=frozenset(b for b in range(rotating) if sharding and not sharding.owns(b)),
        )
        self._tensors = tensors
        self._states = states
        self._rotation = rotation
        self._scaler = scaler
        self._sharding = sharding
        self._always = always
        self._mixed = precision != "fp32"

    def save(self) -> dict[str, Any]:
        """The state dict; with ``shard_state`` on several ranks, a collective."""
        groups = [self._states.copy(b, self._mixed) for b in range(len(self._tensors))]
        if self._sharding is not None:  # each group as its owner keeps it
            groups = [
                g if b == self._always else self._sharding.share(b, g) for b, g in enumerate(groups)
            ]
        return {
            "hift": {
                **self.layout.to_meta(),
                **self._rotation.to_meta(),
                "scaler": self._scaler.state_dict() if self._scaler else None,
            },
            "groups": groups,
        }

    def load(self, state_dict: dict[str, Any]) -> None:
        """Checks ``state_dict`` whole, then loads every group (paging each out before the next),
        the queue and the loss scaler.

        Raises:
            ValueError: If it does not fit :attr:`layout` or is damaged; nothing changed then.
        """
        meta = validate_state_dict(state_dict, self.layout)
        for b, saved in enumerate(state_dict["groups"]):
            if is_placeholder(saved):  # a group another rank keeps (checked above)
                continue
            saved = {**saved, "masters": saved["masters"] if self._mixed else None}
            self._states.load(b, saved, self._tensors[b].params[0].device)
        self._rotation.load_meta(meta)
        if self._scaler is not None and meta.get("scaler") is not None:
            self._scaler.load_state_dict(meta["scaler"])
