"""The run's HiFT schedule, worked out once the model and the data are loaded.

Three options of :class:`~hiftune.recipes.config.TrainRecipeConfig` can only be settled against
the loaded model and the run's number of optimizer steps:

* ``always_active="auto"``: the parameters the checkpoint did not contain (a newly initialised
  classification head, ``classifier.*`` / ``score.*``) are trained at every step beside the
  rotating groups, if that is cheap (:func:`resolve_always_active`);
* ``units_per_group="auto"``: m is the smallest one, from :data:`FALLBACK_UNITS_PER_GROUP` up,
  whose groups each get :data:`MIN_UPDATES` updates within the run's steps
  (:func:`choose_units_per_group`);
* the budget guard: how many updates each group gets (:func:`updates_per_group`), with a warning
  naming what to change when one would get fewer than :data:`MIN_UPDATES` (the numbers are
  here; :mod:`.plan` words them).

:func:`resolve_schedule` settles them; the plan (:mod:`.plan`) states them and
``TrainRecipeConfig.hift_config`` hands them to the engine. The defaults of these options live
here, in one place.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..engine.schedule.rotation import updates_per_group
from ..engine.split.units import always_active_names
from ..errors import UserError, first_line

AUTO = "auto"
NONE = "none"
#: The default of ``units_per_group`` (``--units-per-group``): an integer m, or ``"auto"``.
#: ``auto`` won the quality benchmark's short budgets (docs/quality.md).
UNITS_PER_GROUP: int | str = AUTO
#: m of ``units_per_group="auto"`` when the number of optimizer steps is not known, and the
#: smallest m it picks: smaller groups save memory but learned slower (docs/quality.md).
FALLBACK_UNITS_PER_GROUP = 4
#: The default of ``always_active`` (``--always-active``): ``"auto"``, ``"none"`` or regexes.
ALWAYS_ACTIVE: str = AUTO
#: The default factor on the always-active parameters' learning rate (``--always-active-lr-scale``):
#: a new head trained at every step at 3x the rate caught up fastest (docs/quality.md).
ALWAYS_ACTIVE_LR_SCALE = 3.0
#: The default K, optimizer steps per group before the next one (``--steps-per-group``).
STEPS_PER_GROUP = 1
#: Fewest updates a group should get in a run; fewer draws a warning (and ``auto`` m avoids it).
MIN_UPDATES = 8
#: ``always_active="auto"`` takes new parameters only up to this share of the model's: training
#: them at every step keeps their gradients and optimizer state on the device all run.
AUTO_MAX_SHARE = 0.05


def parse_units_per_group(value: Any) -> int | str:
    """``units_per_group`` as the recipe keeps it: an integer >= 1 or ``"auto"``.

    Raises:
        UserError: For anything else.
    """
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"units_per_group must be an integer >= 1 or auto, got {value!r}")
    return value


def parse_always_active(value: Any) -> str | list[str]:
    """``always_active`` as the recipe keeps it: ``"auto"``, ``"none"`` or a list of regexes.

    A string other than ``auto`` / ``none`` is comma-separated regexes; an empty list is none.

    Raises:
        UserError: For another type, or a regex that does not compile.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in (AUTO, NONE):
            return text.lower()
        value = [p.strip() for p in text.split(",")]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise UserError(
            f"always_active must be auto, none or parameter-name regexes, got {value!r}"
        )
    patterns = [p.strip() for p in value if p.strip()]
    if not patterns:
        return NONE
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise UserError(f"always_active has an invalid regex {pattern!r}: {e}") from None
    return patterns


def refuse_for_fpft(cfg: Any) -> None:
    """Refuses HiFT's schedule options in ``cfg`` (``--method fpft``, which trains everything).

    ``always_active`` ``auto`` / ``none`` and ``units_per_group`` are let through: they only
    describe the split the plan shows.

    Raises:
        UserError: For always-active regexes, an LR scale or a K other than the defaults.
    """
    why = "is HiFT's schedule (--method hift); --method fpft trains every parameter every step"
    if isinstance(cfg.always_active, list):
        raise UserError(f"always_active={','.join(cfg.always_active)} {why}")
    if cfg.always_active_lr_scale != ALWAYS_ACTIVE_LR_SCALE:
        raise UserError(f"always_active_lr_scale={cfg.always_active_lr_scale:g} {why}")
    if cfg.steps_per_group != STEPS_PER_GROUP:
        raise UserError(f"steps_per_group={cfg.steps_per_group} {why}")


def steps_for_updates(num_groups: int, steps_per_group: int, min_updates: int) -> int:
    """The fewest optimizer steps in which every group gets ``min_updates`` updates."""
    # The last group in order is the last to reach it: q full cycles, then the other groups'
    # visits and s steps of its own.
    q, s = divmod(min_updates, steps_per_group)
    last = (num_groups - 1) * steps_per_group + s if s else 0
    return q * num_groups * steps_per_group + last


def choose_units_per_group(
    n_units: int,
    total_steps: int,
    steps_per_group: int = 1,
    min_updates: int = MIN_UPDATES,
    smallest: int = FALLBACK_UNITS_PER_GROUP,
) -> int:
    """``units_per_group="auto"``: the smallest m, from ``smallest`` up, whose groups each get
    ``min_updates`` updates in ``total_steps`` steps.

    Smaller groups need less memory, but each is trained less often: on a long budget m stays
    at ``smallest`` (whose groups learned about as well as larger ones, docs/quality.md), and a
    short budget gets fewer, larger groups rather than groups trained a handful of times or
    never. When even one group of all units would get fewer, that is the answer (m =
    ``n_units``), the most updates the budget can give.

    Args:
        n_units: The model's number of units (k = ceil(n / m) groups).
        total_steps: Optimizer steps of the run.
        steps_per_group: K.
        min_updates: Updates every group should get.
        smallest: The smallest m to pick (capped at ``n_units``).
    """
    for m in range(min(smallest, n_units), n_units + 1):
        k = math.ceil(n_units / m)
        if updates_per_group(total_steps, k, steps_per_group)[-1] >= min_updates:
            return m
    return n_units


def planned_steps(
    examples: int,
    *,
    batch_size: int,
    grad_accum: int = 1,
    epochs: float = 1.0,
    max_steps: int | None = None,
    processes: int = 1,
    drop_last: bool = False,
) -> int:
    """The optimizer steps ``transformers.Trainer`` will take, as it counts them.

    Args:
        examples: Training examples.
        batch_size: Examples per device and micro-batch (the Trainer's ``train_batch_size``).
        grad_accum: Micro-batches per optimizer step.
        epochs: Epochs (used when ``max_steps`` is not given).
        max_steps: Optimizer steps, overriding ``epochs`` (``None`` or < 1: not given).
        processes: Data-parallel processes; each reads its share of the batches.
        drop_last: Whether an incomplete last batch is dropped.
    """
    if max_steps is not None and max_steps > 0:
        return max_steps
    per_step = batch_size * processes
    batches = examples // per_step if drop_last else math.ceil(examples / per_step)
    per_epoch = max(math.ceil(batches / grad_accum), 1)
    return math.ceil(epochs * per_epoch)


@dataclass(frozen=True)
class AlwaysActive:
    """The parameters trained at every step, as resolved for the loaded model.

    Attributes:
        patterns: The regexes handed to the engine (``HiFTConfig.always_active``).
        names: The parameters they name.
        note: Why ``auto`` left new parameters in the unit split, if it did.
    """

    patterns: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    note: str | None = None


def resolve_always_active(
    model: nn.Module, setting: str | Sequence[str], new_parameters: Iterable[str] = ()
) -> AlwaysActive:
    """What ``always_active`` means for ``model``.

    ``"auto"`` takes the trainable parameters the checkpoint did not contain
    (``new_parameters``, the loader's missing keys), unless training them at every step is not
    cheap: together more than :data:`AUTO_MAX_SHARE` of the model, or one tied to a weight the
    checkpoint had (it would drag that weight, e.g. the embedding, into every step). Then they
    stay in the unit split, and :attr:`AlwaysActive.note` says so. ``"none"`` is nothing;
    regexes are matched in full against the parameter names.

    Args:
        model: The loaded model.
        setting: ``"auto"``, ``"none"`` or a list of regexes.
        new_parameters: Names of the parameters the loader initialised afresh.

    Raises:
        UserError: If a regex matches no trainable parameter.
    """
    if setting == NONE:
        return AlwaysActive()
    if setting != AUTO:
        patterns = tuple(setting)
        try:
            names, _ = always_active_names(model, patterns)
        except ValueError as e:
            raise UserError(f"--always-active: {first_line(e)}") from e
        return AlwaysActive(patterns, tuple(names))
    named = list(model.named_parameters(remove_duplicate=False))  # a tied tensor by every name
    trainable = {n: p for n, p in named if p.requires_grad}
    fresh = set(new_parameters)
    new = [n for n in trainable if n in fresh]  # in the model's order
    if not new:
        return AlwaysActive()
    listed = ", ".join(new)
    kept = "stay in the unit split; --always-active REGEX trains them at every step anyway"
    old = {id(p) for n, p in named if n not in new}
    tied = [n for n in new if id(trainable[n]) in old]
    if tied:
        note = f"the new parameters ({listed}) {kept}: {tied[0]} is tied to a checkpoint weight"
        return AlwaysActive(note=note)
    size = sum({id(trainable[n]): trainable[n].numel() for n in new}.values())
    total = sum(p.numel() for p in model.parameters())
    if size > AUTO_MAX_SHARE * total:
        note = (
            f"the new parameters ({listed}) {kept}: they are {size / total:.0%} of the model, "
            f"more than the {AUTO_MAX_SHARE:.0%} auto trains at every step"
        )
        return AlwaysActive(note=note)
    return AlwaysActive(tuple(re.escape(n) for n in new), tuple(new))


@dataclass
class Schedule:
    """The run's HiFT schedule, settled for the loaded model and the step budget.

    Attributes:
        units_per_group: m.
        units_reason: Why this m, when ``units_per_group="auto"`` chose it.
        n_units: The model's rotating units (``None`` if not counted).
        steps_per_group: K.
        total_steps: The run's optimizer steps (``None`` if not known).
        always_active: Regexes of the always-active parameters (for the engine).
        always_active_names: The parameters they name.
        always_active_lr_scale: The factor on their learning rate.
        notes: What the plan should say about these choices.
    """

    units_per_group: int
    units_reason: str | None = None
    n_units: int | None = None
    steps_per_group: int = STEPS_PER_GROUP
    total_steps: int | None = None
    always_active: tuple[str, ...] = ()
    always_active_names: tuple[str, ...] = ()
    always_active_lr_scale: float = ALWAYS_ACTIVE_LR_SCALE
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (kept in the run file: a resumed ``auto`` run keeps its m)."""
        out = asdict(self)
        out["always_active"] = list(self.always_active)
        out["always_active_names"] = list(self.always_active_names)
        return out


def resolve_schedule(
    cfg: Any,
    *,
    always: AlwaysActive | None = None,
    n_units: int | None = None,
    total_steps: int | None = None,
    resumed_units_per_group: int | None = None,
) -> Schedule:
    """Settles ``cfg``'s ``auto`` options.

    Args:
        cfg: The run's :class:`~hiftune.recipes.config.TrainRecipeConfig`.
        always: The resolved always-active parameters (:func:`resolve_always_active`).
        n_units: The model's rotating units (without the always-active parameters).
        total_steps: The run's optimizer steps, if known.
        resumed_units_per_group: The m a resumed run trained with: ``auto`` keeps it (its
            checkpoint holds that split), whatever the new step count would choose.
    """
    always = always or AlwaysActive()
    hift = cfg.method == "hift"
    schedule = Schedule(
        units_per_group=FALLBACK_UNITS_PER_GROUP,
        n_units=n_units,
        steps_per_group=cfg.steps_per_group,
        total_steps=total_steps,
        always_active=always.patterns if hift else (),
        always_active_names=always.names if hift else (),
        always_active_lr_scale=cfg.always_active_lr_scale,
    )
    if hift and always.note:
        schedule.notes.append(always.note)
    if cfg.units_per_group != AUTO:
        schedule.units_per_group = cfg.units_per_group
    elif not hift:
        schedule.units_reason = (
            f"auto; FPFT does not use the groups (the fallback m={FALLBACK_UNITS_PER_GROUP})"
        )
    elif resumed_units_per_group is not None:
        schedule.units_per_group = resumed_units_per_group
        schedule.units_reason = "auto, as chosen when the resumed run started"
    elif total_steps is None or n_units is None:
        schedule.units_reason = (
            f"auto, the fallback m={FALLBACK_UNITS_PER_GROUP}: the number of optimizer steps "
            "is not known"
        )
    else:
        m = choose_units_per_group(n_units, total_steps, cfg.steps_per_group)
        schedule.units_per_group = m
        if updates_per_group(total_steps, math.ceil(n_units / m), cfg.steps_per_group)[-1] < (
            MIN_UPDATES
        ):
            schedule.units_reason = (
                f"auto: all {n_units} units in one group, and still fewer than {MIN_UPDATES} "
                f"updates in {total_steps} steps"
            )
        else:
            schedule.units_reason = (
                f"auto: the smallest m from {FALLBACK_UNITS_PER_GROUP} up whose groups each get "
                f"at least {MIN_UPDATES} updates in {total_steps} steps"
            )
    if n_units is not None:
        schedule.units_per_group = min(schedule.units_per_group, n_units)
    return schedule
