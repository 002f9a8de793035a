"""The one configuration object of hiftune."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

ORDERS = ("bottom2up", "top2down", "random")
OFFLOADS = ("none", "host", "disk")
PRECISIONS = ("fp32", "bf16", "fp16")
GROUP_BY = ("count", "size")

Order = Literal["bottom2up", "top2down", "random"]
Offload = Literal["none", "host", "disk"]
Precision = Literal["fp32", "bf16", "fp16"]
GroupBy = Literal["count", "size"]


@dataclass
class HiFTConfig:
    """How HiFT splits a model into groups and trains them.

    Every field is validated on construction; a bad value raises ``ValueError`` naming the field
    and what is allowed.

    Attributes:
        units_per_group: m, the number of consecutive units trained together in one step (>= 1).
            The number of groups is ``k = ceil(n / m)`` for a model of n units.
        group_by: How consecutive units are packed into the ``k = ceil(n / m)`` groups:
            ``"count"`` (m units per group, the last may hold fewer; the paper's split) or
            ``"size"`` (the same k groups, with boundaries chosen so that the largest group holds
            as few parameters as the units allow).
        max_unit_params: Size budget of a unit, in trainable parameters. A unit over budget is
            split: a block into its child modules (attention, MLP, experts; recursively, small
            consecutive children packed together in execution order), any other unit into its
            parameters, and a single parameter over budget into row shards along its first
            dimension (see :mod:`hiftune.engine.split.subunits` for the names). ``"auto"`` is the
            trainable parameter count of the largest block (so that no unit is larger than a
            block; no split when there are no blocks, as with a ``units`` override); ``None`` turns
            splitting off (the paper's split: a unit is never smaller than a layer).
        order: The order in which groups are trained: ``"bottom2up"`` (embedding first),
            ``"top2down"`` (head first) or ``"random"`` (shuffled once with ``seed``, then fixed).
        seed: Seed of the ``"random"`` order.
        units: Optional override of the unit split: a mapping from unit name to the parameter
            names (regular expressions, matched in full against ``model.named_parameters()``
            names) of that unit, in bottom-up order. Every trainable parameter must match exactly
            one unit.
        blocks: Optional dotted path of the container that holds the transformer blocks (e.g.
            ``"model.layers"``), for models where the automatic search picks the wrong one.
        offload: Where inactive groups' optimizer state (and fp32 master weights) live:
            ``"none"`` (where the optimizer put it), ``"host"`` (CPU memory; pinned on CUDA) or
            ``"disk"`` (safetensors files under ``offload_dir``).
        offload_dir: Directory for ``offload="disk"``. ``None`` uses a fresh temporary directory
            that is removed when the optimizer is closed or garbage-collected.
        prefetch: Load the next group's state in the background while the current step computes.
        precision: ``"fp32"``, or ``"bf16"`` / ``"fp16"`` for hierarchical mixed precision: the
            model's weights stay in half precision and fp32 master weights exist only for the
            active group on the device.
        compact_masters: With ``precision="bf16"``, store each inactive group's fp32 masters as
            the low bits their bf16 weights lack (2.125 bytes per parameter instead of 4; see
            :mod:`hiftune.engine.state.compact`). Exact: training equals ``False`` bit for bit,
            and checkpoints hold whole masters either way. No effect with other precisions.
        sync_gradients: Average the active group's gradients over all ranks in :meth:`step`
            (data parallelism without DDP, which cannot follow HiFT's changing set of trainable
            parameters). ``None`` does it whenever ``torch.distributed`` is initialised with more
            than one process; ``False`` never (e.g. when something else already synchronises).
        shard_state: In data parallelism, keep each group's optimizer state only on the rank that
            owns it (group ``b`` on rank ``b % N``), which steps it and broadcasts the new weights
            (see :mod:`hiftune.engine.state.zero`). Results equal the unsharded run; paged state per rank
            drops about N times. ``precision="fp32"`` only; no effect on one process.
        always_active: Parameters trained at every step, beside the rotating groups: regular
            expressions matched in full against ``model.named_parameters()`` names (a tied
            parameter by any of its names). They leave the unit split and get an optimizer of
            their own whose state stays on the device, never paged. Meant for a small, newly
            initialised head (``classifier.*``, ``score.*``) that would otherwise learn one step in
            k; a pattern that matches no trainable parameter is an error, and a large or tied
            parameter draws a warning (see :mod:`hiftune.engine.schedule.rotation`).
        always_active_lr_scale: Factor on the learning rate of the ``always_active`` parameters
            (a scheduler scales from it). 3 by default: a new head trained at every step at 3x
            the rate did best in the quality benchmark (docs/quality.md).
        steps_per_group: K, the optimizer steps each group takes before the next one becomes
            active (BAdam's "switch every K steps"); a cycle is then ``k * K`` steps, and a
            delayed scheduler still advances once per cycle. Each group keeps its optimizer state
            across its visits. 1 is the paper's schedule.
        init_loss_scale: Initial dynamic loss scale for ``precision="fp16"``.
        loss_scale_growth_interval: Steps without overflow after which the fp16 loss scale doubles.
    """

    units_per_group: int = field(default=1, metadata={"help": "Units per group (m >= 1)."})
    group_by: GroupBy = field(
        default="count", metadata={"help": f"One of {GROUP_BY}: m units, or balanced sizes."}
    )
    max_unit_params: int | Literal["auto"] | None = field(
        default="auto",
        metadata={"help": "Unit size budget in parameters ('auto': the largest block; None: off)."},
    )
    order: Order = field(default="bottom2up", metadata={"help": f"One of {ORDERS}."})
    seed: int = field(default=0, metadata={"help": "Seed of the random order."})
    units: Mapping[str, Sequence[str]] | None = field(
        default=None, metadata={"help": "Override: unit name -> parameter-name regexes."}
    )
    blocks: str | None = field(
        default=None, metadata={"help": "Dotted path of the block container, e.g. model.layers."}
    )
    offload: Offload = field(default="host", metadata={"help": f"One of {OFFLOADS}."})
    offload_dir: str | None = field(default=None, metadata={"help": "Directory for disk paging."})
    prefetch: bool = field(default=True, metadata={"help": "Prefetch the next group's state."})
    precision: Precision = field(default="fp32", metadata={"help": f"One of {PRECISIONS}."})
    compact_masters: bool = field(
        default=True,
        metadata={"help": "bf16: page out masters as the low bits their bf16 weights lack."},
    )
    sync_gradients: bool | None = field(
        default=None,
        metadata={
            "help": "Average the active group's gradients over ranks (None: when distributed)."
        },
    )
    shard_state: bool = field(
        default=False,
        metadata={"help": "Distributed: each rank keeps and steps only its share of the groups."},
    )
    always_active: Sequence[str] = field(
        default=(),
        metadata={"help": "Regexes of parameters trained at every step (e.g. a new head)."},
    )
    always_active_lr_scale: float = field(
        default=3.0, metadata={"help": "Learning-rate factor of the always-active parameters."}
    )
    steps_per_group: int = field(
        default=1, metadata={"help": "Optimizer steps per group before switching (K >= 1)."}
    )
    init_loss_scale: float = field(default=2.0**16, metadata={"help": "fp16 initial loss scale."})
    loss_scale_growth_interval: int = field(
        default=2000, metadata={"help": "fp16: steps without overflow before the scale doubles."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.units_per_group, bool) or not isinstance(self.units_per_group, int):
            raise ValueError(
                f"units_per_group must be an integer >= 1, got {self.units_per_group!r}"
            )
        if self.units_per_group < 1:
            raise ValueError(f"units_per_group must be >= 1, got {self.units_per_group}")
        _check_choice("group_by", self.group_by, GROUP_BY)
        budget = self.max_unit_params
        if budget is not None and budget != "auto" and not _is_positive_int(budget):
            raise ValueError(
                "max_unit_params must be 'auto', None or an integer >= 1 (parameters per unit), "
                f"got {budget!r}"
            )
        _check_choice("order", self.order, ORDERS)
        _check_choice("offload", self.offload, OFFLOADS)
        _check_choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.units is not None:
            if not isinstance(self.units, Mapping) or not self.units:
                raise ValueError(
                    "units must be a non-empty mapping of unit name -> list of parameter-name "
                    f"regexes, got {self.units!r}"
                )
            for name, patterns in self.units.items():
                if isinstance(patterns, str) or not isinstance(patterns, Sequence) or not patterns:
                    raise ValueError(
                        f"units[{name!r}] must be a non-empty list of regexes, got {patterns!r}"
                    )
        if self.blocks is not None and self.units is not None:
            raise ValueError("give either units (a full override) or blocks, not both")
        if self.offload_dir is not None and self.offload != "disk":
            raise ValueError(f"offload_dir is only used with offload='disk', not {self.offload!r}")
        if self.sync_gradients not in (None, True, False):
            raise ValueError(
                f"sync_gradients must be None, True or False, got {self.sync_gradients!r}"
            )
        if self.compact_masters not in (True, False):
            raise ValueError(f"compact_masters must be True or False, got {self.compact_masters!r}")
        if self.shard_state not in (True, False):
            raise ValueError(f"shard_state must be True or False, got {self.shard_state!r}")
        if self.shard_state and self.precision != "fp32":
            raise ValueError(
                f"shard_state=True supports precision='fp32' only, not {self.precision!r}"
            )
        if isinstance(self.always_active, str):
            self.always_active = (self.always_active,)
        if not isinstance(self.always_active, Sequence) or not all(
            isinstance(p, str) and p for p in self.always_active
        ):
            raise ValueError(
                "always_active must be a list of parameter-name regexes, got "
                f"{self.always_active!r}"
            )
        for pattern in self.always_active:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"always_active has an invalid regex {pattern!r}: {e}") from None
        self.always_active = tuple(self.always_active)
        scale = self.always_active_lr_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"always_active_lr_scale must be a number > 0, got {scale!r}")
        if not math.isfinite(scale):
            raise ValueError(f"always_active_lr_scale must be finite, got {scale!r}")
        if not _is_positive_int(self.steps_per_group):
            raise ValueError(
                f"steps_per_group must be an integer >= 1, got {self.steps_per_group!r}"
            )
        if not self.init_loss_scale > 0:
            raise ValueError(f"init_loss_scale must be > 0, got {self.init_loss_scale}")
        if self.loss_scale_growth_interval < 1:
            raise ValueError(
                f"loss_scale_growth_interval must be >= 1, got {self.loss_scale_growth_interval}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as plain Python values (safe for JSON and ``torch.load``)."""
        out = dataclasses.asdict(self)
        out["always_active"] = list(out["always_active"])
        if out["units"] is not None:
            out["units"] = {k: list(v) for k, v in out["units"].items()}
        return out


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
