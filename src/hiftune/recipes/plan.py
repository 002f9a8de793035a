"""What a run is about to do, stated before training: units, groups, schedule, memory, data.

:func:`build_plan` describes the loaded model's HiFT split (the same
:func:`~hiftune.memory.inspect.inspect_split` that ``hiftune inspect`` shows), the schedule
(:mod:`.schedule`: m and why, the always-active parameters, how many updates each group gets in
the run's steps, with a warning when a group would get too few) and the memory
:func:`~hiftune.memory.estimate.estimate` predicts for HiFT and for full fine-tuning with this
run's optimizer, precision, batch size and sequence length. The recipe logs it (or hands it to
the caller's ``on_plan``, which the command line prints) and keeps it in ``report.json``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..errors import first_line
from ..memory.estimate import EstimateRow, estimate
from ..memory.inspect import inspect_split
from .schedule import (
    MIN_UPDATES,
    Schedule,
    choose_units_per_group,
    resolve_schedule,
    steps_for_updates,
    updates_per_group,
)

#: Groups listed by name in :meth:`Plan.format`; longer lists show their ends.
SHOWN_GROUPS = 6

_NUMBERED = re.compile(r"^(?P<prefix>.*?)(?P<n>\d+)$")


@dataclass(frozen=True)
class MemoryFigure:
    """Predicted memory of one method at its peak (MiB), from the estimator.

    Attributes:
        weights: Weights (and fp32 masters) on the device.
        grads: Gradients.
        states: Optimizer state.
        activations: Saved activations and the loss's logits for the batch and sequence length
            (an estimate).
        peak_group: The group that sets the peak (``"all"`` for full fine-tuning).
        host: The other groups' paged optimizer state and fp32 masters in host memory (host
            paging; 0 otherwise), not part of :attr:`total`.
        disk: The same on disk (disk paging).
    """

    weights: float
    grads: float
    states: float
    activations: float | None
    peak_group: str
    host: float = 0.0
    disk: float = 0.0

    @property
    def total(self) -> float:
        """Everything on the device, MiB."""
        return self.weights + self.grads + self.states + (self.activations or 0.0)

    @classmethod
    def of(cls, row: EstimateRow) -> MemoryFigure:
        """The figure of one estimator row."""
        act = row.activations_mib_estimate
        if act is not None:  # the estimator counts the loss's logits on their own
            act += row.logits_mib_estimate or 0.0
        return cls(
            row.weights_mib,
            row.grads_mib,
            row.states_mib,
            act,
            row.group,
            host=row.host_gib * 1024,
            disk=row.disk_gib * 1024,
        )


@dataclass
class Plan:
    """The run, as it is about to train; ``to_dict()`` goes into ``report.json``.

    Attributes:
        model: The model's name.
        method: ``hift`` or ``fpft``.
        params: Parameters of the model (a tied tensor once).
        units: Unit names, bottom-up.
        groups: Group names in training order.
        units_per_group: m.
        order: The group order.
        peak_group: The largest group (by parameters) and its size.
        peak_group_params: Its parameters.
        optimizer: The optimizer's name.
        precision: The precision.
        batch_size: Examples per device and micro-batch.
        seq_len: Tokens per example at most (the estimate's sequence length).
        hift: HiFT's predicted peak memory (``None`` if the estimator cannot build the model).
        fpft: Full fine-tuning's.
        data: How the data was split (from the data loader), if it said.
        train_examples: Training examples.
        eval_examples: Evaluation examples.
        units_reason: Why this m, when ``units_per_group="auto"`` chose it.
        steps_per_group: K, consecutive steps per group.
        total_steps: The run's optimizer steps, if known.
        updates: Updates (optimizer steps) of each group in training order, if the steps are
            known.
        budget: How the steps fall on the groups, in words.
        always_active: Parameters trained at every step beside the groups.
        always_active_lr_scale: The factor on their learning rate.
        notes: What could not be worked out, and why; choices worth knowing.
        warnings: What will likely go wrong (a group trained too few times), and what to change.
    """

    model: str
    method: str
    params: int
    units: list[str]
    groups: list[str]
    units_per_group: int
    order: str
    peak_group: str
    peak_group_params: int
    optimizer: str
    precision: str
    batch_size: int
    seq_len: int
    hift: MemoryFigure | None = None
    fpft: MemoryFigure | None = None
    data: str | None = None
    train_examples: int | None = None
    eval_examples: int | None = None
    units_reason: str | None = None
    steps_per_group: int = 1
    total_steps: int | None = None
    updates: list[int] = field(default_factory=list)
    budget: str | None = None
    always_active: list[str] = field(default_factory=list)
    always_active_lr_scale: float = 1.0
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (memory figures in MiB, with their totals)."""
        out = asdict(self)
        for method in ("hift", "fpft"):
            figure = getattr(self, method)
            if figure is not None:
                out[method]["total"] = figure.total
        return out

    def format(self) -> str:
        """The plan as a few readable lines."""
        what = "HiFT" if self.method == "hift" else "full fine-tuning (FPFT)"
        lines = [f"plan: {what} of {self.model} ({_count(self.params)} parameters)"]
        if self.units:
            lines.append(f"  units: {len(self.units)} ({compress_names(self.units)})")
            shown = [compress_names([g]) for g in self.groups]
            if len(shown) > SHOWN_GROUPS:
                shown = [*shown[: SHOWN_GROUPS - 2], "...", *shown[-2:]]
            trained = "HiFT's, not used by FPFT"
            if self.method == "hift":
                k = self.steps_per_group
                trained = f"{k} steps each in turn" if k > 1 else "one per step"
            lines.append(
                f"  groups: {len(self.groups)} of m={self.units_per_group} units, {self.order}, "
                f"{trained}: {', '.join(shown)}"
            )
            lines.append(
                f"  largest group: {compress_names([self.peak_group])} "
                f"({_count(self.peak_group_params)} parameters)"
            )
        if self.units_reason:
            lines.append(f"  units per group: m={self.units_per_group}, {self.units_reason}")
        if self.method == "hift" and self.budget:
            lines.append(f"  updates: {self.budget}")
        if self.method == "hift" and self.always_active:
            lines.append(
                f"  always active: {', '.join(self.always_active)} "
                f"(lr x{self.always_active_lr_scale:g})"
            )
        if self.hift is not None and self.fpft is not None:
            # The memory peak may be another group than the largest one: a row shard's step
            # also holds its weight's full-size gradient (docs/units.md).
            lines.append(
                f"  memory estimate ({self.optimizer}, {self.precision}, batch {self.batch_size} "
                f"x {self.seq_len} tokens): HiFT {_gib(self.hift)} at group "
                f"{compress_names([self.hift.peak_group])} vs FPFT {_gib(self.fpft)} "
                f"({self.fpft.total / max(self.hift.total, 1e-9):.1f}x)"
            )
            paged, where = max((self.hift.host, "host memory"), (self.hift.disk, "files on disk"))
            if paged:
                lines.append(
                    f"  paged out: {paged / 1024:.2f} GiB in {where} (the other groups' optimizer "
                    "state and fp32 masters), beside HiFT's device figure"
                )
        if self.data:
            lines.append(f"  data: {self.data}")
        elif self.train_examples is not None:
            lines.append(
                f"  examples: {self.train_examples} for training, {self.eval_examples} for "
                "evaluation"
            )
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def build_plan(
    model: nn.Module,
    cfg: Any,
    *,
    name: str,
    schedule: Schedule | None = None,
    steps_per_epoch: int | None = None,
    data: str | None = None,
    train_examples: int | None = None,
    eval_examples: int | None = None,
) -> Plan:
    """Describes the run of ``cfg`` on the loaded ``model``.

    Never raises for what it cannot work out (a model the estimator cannot rebuild from its
    config, say): that part is left out and named in :attr:`Plan.notes`. A HiFT run whose groups
    would get fewer than :data:`~hiftune.recipes.schedule.MIN_UPDATES` updates each gets a
    warning in :attr:`Plan.warnings` naming what to change.

    Args:
        model: The loaded model (not changed).
        cfg: The run's :class:`~hiftune.recipes.config.TrainRecipeConfig`.
        name: The model's name.
        schedule: The run's resolved schedule (:func:`~hiftune.recipes.schedule.resolve_schedule`;
            default: ``cfg``'s, with ``auto`` options at their fallbacks and no step count).
        steps_per_epoch: Optimizer steps per epoch of an epoch-based run (a too-short budget's
            fix is then said in epochs).
        data: How the data was split, to state it.
        train_examples: Training examples.
        eval_examples: Evaluation examples.
    """
    head = "seq-cls" if cfg.task == "seq-cls" else "causal-lm"
    schedule = schedule or resolve_schedule(cfg)
    m = schedule.units_per_group
    hift_config = cfg.hift_config(units_per_group=m, always_active=schedule.always_active)
    plan = Plan(
        model=name,
        method=cfg.method,
        params=sum(p.numel() for p in model.parameters()),
        units=[],
        groups=[],
        units_per_group=m,
        order=cfg.order,
        peak_group="",
        peak_group_params=0,
        optimizer=cfg.optimizer,
        precision=cfg.precision,
        batch_size=cfg.batch_size,
        seq_len=cfg.max_length,
        data=data,
        train_examples=train_examples,
        eval_examples=eval_examples,
        units_reason=schedule.units_reason,
        steps_per_group=schedule.steps_per_group,
        total_steps=schedule.total_steps,
        always_active=list(schedule.always_active_names),
        always_active_lr_scale=schedule.always_active_lr_scale,
        notes=list(schedule.notes),
    )
    try:
        split = inspect_split(
            model,
            units_per_group=m,
            order=cfg.order,
            seed=cfg.seed,
            precision=cfg.precision,
            config=hift_config,
            check_gradients=False,
        )
    except Exception as e:  # informative only: a run must not stop over its plan
        plan.notes.append(f"no unit split: {first_line(e)}")
    else:
        plan.units = [u.name for u in split.units]
        plan.groups = [g.name for g in split.groups]
        plan.peak_group = split.peak_group
        plan.peak_group_params = max(g.params for g in split.groups)
        if cfg.method == "hift" and schedule.total_steps is not None:
            _state_budget(plan, schedule, steps_per_epoch)
    try:
        rows = estimate(
            model.config,  # rebuilt on the meta device: nothing of the loaded model is touched
            units_per_group=m,
            config=hift_config,
            optimizers=[cfg.optimizer],
            precisions=[cfg.precision],
            task=head,
            num_labels=getattr(model.config, "num_labels", 2),
            batch_size=cfg.batch_size,
            seq_len=cfg.max_length,
            gradient_checkpointing=_checkpointing(cfg),
            offload=cfg.offload,
        )
    except Exception as e:  # e.g. a custom architecture that cannot be built from its config
        plan.notes.append(f"no memory estimate: {first_line(e)}")
    else:
        by_method = {r.method: r for r in rows}
        plan.hift = MemoryFigure.of(by_method["hift"])
        plan.fpft = MemoryFigure.of(by_method["fpft"])
    return plan


def _checkpointing(cfg: Any) -> bool:
    """Whether the run recomputes activations (either of transformers' names for it)."""
    extra = cfg.training_args
    return bool(extra.get("gradient_checkpointing") or extra.get("activation_checkpointing"))


def _state_budget(plan: Plan, schedule: Schedule, steps_per_epoch: int | None) -> None:
    """How the run's steps fall on the groups, and a warning when a group gets too few."""
    total, per_group, groups = schedule.total_steps or 0, schedule.steps_per_group, plan.groups
    k = len(groups)
    plan.updates = updates_per_group(total, k, per_group)
    cycles = total // (k * per_group)
    visits = f" x {per_group} steps" if per_group > 1 else ""
    plan.budget = (
        f"{total} steps = {cycles} cycle{'' if cycles == 1 else 's'} of {k} "
        f"group{'' if k == 1 else 's'}{visits}"
    )
    if len(set(plan.updates)) == 1:
        plan.budget += f": {_updates(plan.updates[0])} per group"
    else:
        parts = [
            f"{_updates(u) if u else 'none'} for {_named(groups, plan.updates, u)}"
            for u in sorted(set(plan.updates), reverse=True)
        ]
        plan.budget += f" and {total % (k * per_group)} steps: {'; '.join(parts)}"
    fewest = min(plan.updates)
    if fewest >= MIN_UPDATES:
        return
    if fewest == 0:
        never = [g for g, u in zip(groups, plan.updates, strict=True) if u == 0]
        what = f"{compress_names(never)} {'is' if len(never) == 1 else 'are'} never trained"
    else:
        few = sorted({u for u in plan.updates if u < MIN_UPDATES})
        counts = f"{few[0]}-{few[-1]}" if len(few) > 1 else str(few[0])
        low = [g for g, u in zip(groups, plan.updates, strict=True) if u < MIN_UPDATES]
        verb = "gets" if len(low) == 1 else "get"
        who = "every group gets" if len(low) == k else f"{compress_names(low)} {verb}"
        what = f"{who} only {counts} update{'' if counts == '1' else 's'}"
    fixes = []
    n = schedule.n_units
    if n is not None:  # a larger m, if one gives every group enough
        better = choose_units_per_group(n, total, per_group)
        got = updates_per_group(total, math.ceil(n / better), per_group)[-1]
        if better != plan.units_per_group and got >= MIN_UPDATES:
            fixes.append(f"--units-per-group {better} gives {_updates(got)} per group")
    needed = steps_for_updates(k, per_group, MIN_UPDATES)
    if steps_per_epoch:
        epochs = -(-needed * 100 // steps_per_epoch) / 100  # rounded up, in integers
        fixes.append(f"--epochs {epochs:g} ({needed} steps) gives every group {MIN_UPDATES}")
    else:
        fixes.append(f"--max-steps {needed} gives every group {MIN_UPDATES}")
    plan.warnings.append(
        f"{total} optimizer steps over {k} groups of m={plan.units_per_group}"
        f"{f' ({per_group} steps per visit)' if per_group > 1 else ''}: {what}, fewer than the "
        f"{MIN_UPDATES} updates each group should get; {' or '.join(fixes)}"
    )


def _named(groups: Sequence[str], updates: Sequence[int], count: int) -> str:
    return compress_names([g for g, u in zip(groups, updates, strict=True) if u == count])


def _updates(n: int) -> str:
    return f"{n} update{'' if n == 1 else 's'}"


def compress_names(names: Sequence[str]) -> str:
    """Runs of numbered or sliced names in one line: ``embed[0:49152] in 8 slices, layers.0-29, head``.

    Consecutive ``layers.3``, ``layers.4``, ... become ``layers.3-4``; adjoining row slices of one
    tensor (``embed[0:6144]``, ``embed[6144:12288]``) become ``embed[0:12288] in 2 slices``. A
    group name (``layers.3..layers.6``) stays as it is, the one form of a group's name everywhere
    (progress bar, checkpoints, ``hiftune inspect``); so do other names.
    """
    spans: list[_Span | str] = []
    for raw in names:
        span = _span(raw)
        last = spans[-1] if spans else None
        if span is not None and isinstance(last, _Span) and last.continues_with(span):
            spans[-1] = last.merged(span)
        else:
            spans.append(span if span is not None else raw)
    return ", ".join(str(s) for s in spans)


_SLICED = re.compile(r"^(?P<prefix>.*)\[(?P<lo>\d+):(?P<hi>\d+)\]$")


@dataclass(frozen=True)
class _Span:
    """``prefix`` + numbers ``lo``..``hi`` (``sliced``: rows ``[lo:hi]`` in ``parts`` slices)."""

    prefix: str
    lo: int
    hi: int
    sliced: bool
    parts: int | None

    def continues_with(self, other: _Span) -> bool:
        same = (self.prefix, self.sliced) == (other.prefix, other.sliced)
        return same and other.lo == (self.hi if self.sliced else self.hi + 1)

    def merged(self, other: _Span) -> _Span:
        parts = None if self.parts is None or other.parts is None else self.parts + other.parts
        return _Span(self.prefix, self.lo, other.hi, self.sliced, parts)

    def __str__(self) -> str:
        if self.sliced:
            n = f" in {self.parts} slices" if self.parts and self.parts > 1 else ""
            return f"{self.prefix}[{self.lo}:{self.hi}]{n}"
        return (
            f"{self.prefix}{self.lo}" if self.lo == self.hi else f"{self.prefix}{self.lo}-{self.hi}"
        )


def _span(name: str) -> _Span | None:
    """The span a unit or group name covers, if it is numbered or sliced."""
    if ".." in name:  # a group (first..last unit): named as the engine and inspect name it
        return None
    if m := _SLICED.match(name):
        return _Span(m["prefix"], int(m["lo"]), int(m["hi"]), True, 1)
    if m := _NUMBERED.match(name):
        return _Span(m["prefix"], int(m["n"]), int(m["n"]), False, 1)
    return None


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 10**9 else f"{n / 1e6:.1f}M" if n >= 10**6 else f"{n:,}"


def _gib(figure: MemoryFigure) -> str:
    act = "" if figure.activations is None else f", activations {figure.activations / 1024:.2f}"
    return (
        f"{figure.total / 1024:.2f} GiB (weights {figure.weights / 1024:.2f}, gradients "
        f"{figure.grads / 1024:.2f}, optimizer {figure.states / 1024:.2f}{act})"
    )
