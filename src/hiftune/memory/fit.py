"""``hiftune estimate --fit``: the fastest HiFT plan whose memory fits a device (and host).

The search covers precision (``bf16``, ``fp32``), offload (``none``, ``host``, ``disk``), units per
group m (1, 2, 4, ... and all units in one group), gradient checkpointing (off, on) and the batch
size (the one given, then halved down to 1). Each plan's memory is
:func:`hiftune.memory.estimate.estimate`'s HiFT row: on the device, weights + gradients + optimizer
state + activations + logits; on the host, the paged state and fp32 masters of ``offload="host"``
(``disk`` puts them on disk, counted by neither limit).

Speed is a **model**, not a measurement; one number per plan, the relative time to update every
parameter once (smaller is faster), the product of:

* the number of groups k: HiFT updates one group per step, so an epoch over the groups takes k
  steps (one group of all units, k = 1, is the fastest);
* :data:`CHECKPOINTING` with gradient checkpointing (backward runs each block's forward again);
* :data:`PAGING` per offload (copies to the host overlap compute, disk reads do not always);
* :data:`PRECISION` (fp32 matrix products run at a fraction of bf16's rate);
* :data:`SMALLER_BATCH` per halving of the batch (the same samples in more, less efficient steps).

The plan reported is the fastest that fits; its cost is stated relative to the fastest plan of the
search ignoring the limits. Full fine-tuning is not a candidate (``hiftune estimate`` without
``--fit`` shows its rows).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from ..engine.config import OFFLOADS, HiFTConfig
from ..engine.split.units import split_model
from ..errors import UserError, first_line
from .activations import PassCache
from .estimate import estimate

#: Step time with gradient checkpointing, relative to without: one more forward of each block
#: (forward is about a third of a step).
CHECKPOINTING = 1.33
#: Step time per offload, relative to none.
PAGING = {"none": 1.0, "host": 1.1, "disk": 1.5}
#: Step time per precision, relative to bf16.
PRECISION = {"bf16": 1.0, "fp32": 2.0}
#: Time per sample for each halving of the batch.
SMALLER_BATCH = 1.15
#: Precisions searched, cheapest first (fp16 needs the memory of bf16).
FIT_PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class Plan:
    """One HiFT configuration and its estimated memory and relative time.

    Attributes:
        precision: ``"bf16"`` or ``"fp32"``.
        offload: One of :data:`hiftune.engine.config.OFFLOADS`.
        units_per_group: m.
        groups: k, the number of groups.
        gradient_checkpointing: Whether blocks are checkpointed.
        batch_size: Batch size per step.
        device_gib: Weights, gradients, state, activations and logits on the device, GiB.
        host_gib: Paged state and fp32 masters in host memory, GiB.
        disk_gib: Paged state and fp32 masters on disk, GiB.
        peak_group: The group that sets the device peak of state.
        relative_time: Time to update every parameter once (see the module docstring), relative
            to the fastest plan ignoring the limits (1.0).
        relative_step_time: Time per step on the same scale (without the factor k).
    """

    precision: str
    offload: str
    units_per_group: int
    groups: int
    gradient_checkpointing: bool
    batch_size: int
    device_gib: float
    host_gib: float
    disk_gib: float
    peak_group: str
    relative_time: float
    relative_step_time: float

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready values."""
        return asdict(self)


@dataclass(frozen=True)
class Fit:
    """The answer of :func:`fit`.

    Attributes:
        device_gib: The device limit searched for.
        host_gib: The host limit (``None``: no limit).
        plan: The fastest plan that fits, or ``None``.
        fastest: The fastest plan of the search ignoring the limits (relative time 1.0).
        least: Without a plan: the one needing the least device memory (and host memory for
            it), what it would take; else ``None``.
    """

    device_gib: float
    host_gib: float | None
    plan: Plan | None
    fastest: Plan
    least: Plan | None

    def to_dict(self) -> dict[str, Any]:
        """The answer as JSON-ready values."""
        return {
            "device_gib_limit": self.device_gib,
            "host_gib_limit": self.host_gib,
            "plan": self.plan.to_dict() if self.plan else None,
            "fastest": self.fastest.to_dict(),
            "least": self.least.to_dict() if self.least else None,
        }


def unit_steps(units: int) -> list[int]:
    """The values of m searched: powers of two below ``units``, then ``units`` (one group)."""
    return [*(2**i for i in range(max(0, math.ceil(math.log2(units))))), units]


def batch_steps(batch_size: int) -> list[int]:
    """The batch sizes searched: the one given, halved down to 1."""
    out = [batch_size]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def step_time(precision: str, offload: str, checkpointing: bool, halvings: int) -> float:
    """Relative time of one step (see the module docstring)."""
    time = PRECISION[precision] * PAGING[offload] * SMALLER_BATCH**halvings
    return time * (CHECKPOINTING if checkpointing else 1.0)


def fit(
    model: nn.Module,
    *,
    device_gib: float,
    host_gib: float | None = None,
    optimizer: str = "adamw",
    batch_size: int,
    seq_len: int,
    config: HiFTConfig | None = None,
    task: str = "causal-lm",
    num_labels: int = 2,
) -> Fit:
    """Searches HiFT plans for the fastest one whose memory fits.

    Memory grows with m and the batch and without checkpointing, and is least with paging, so for
    each precision, offload, checkpointing and batch the search takes the largest m that fits
    (a binary search over :func:`unit_steps`), skipping settings that cannot beat the best so far.

    Args:
        model: A model on the ``meta`` device.
        device_gib: Device memory available, GiB.
        host_gib: Host memory available for paged state, GiB (``None``: no limit).
        optimizer: The optimizer's name.
        batch_size: The batch size wanted (smaller ones are tried after it).
        seq_len: Sequence length.
        config: Unit-split overrides, as for :func:`~hiftune.memory.estimate.estimate`.
        task: The task the model is built for.
        num_labels: Classes of a classification head.

    Raises:
        UserError: For limits that are not positive, or a model the unit split cannot handle.
    """
    if not device_gib > 0 or (host_gib is not None and not host_gib >= 0):
        raise UserError(
            f"--fit needs a device size > 0 and a host size >= 0 GiB; got {device_gib}, {host_gib}"
        )
    try:  # the engine reports a model it cannot split as ValueError
        base = (config or HiFTConfig()).to_dict()
        units = len(split_model(model, HiFTConfig(**{**base, "units_per_group": 1}))[0])
    except ValueError as e:
        raise UserError(first_line(e)) from None
    cache: PassCache = {}
    memory: dict[tuple[Any, ...], Plan] = {}
    ms = unit_steps(units)
    batches = batch_steps(batch_size)

    def plan(precision: str, offload: str, checkpointing: bool, halvings: int, m: int) -> Plan:
        key = (precision, offload, checkpointing, halvings, m)
        if key not in memory:
            rows = estimate(
                model,
                units_per_group=m,
                optimizers=[optimizer],
                precisions=[precision],
                config=config,
                task=task,
                num_labels=num_labels,
                batch_size=batches[halvings],
                seq_len=seq_len,
                gradient_checkpointing=checkpointing,
                offload=offload,
                cache=cache,
            )
            row = next(r for r in rows if r.method == "hift")
            groups = math.ceil(units / m)
            step = step_time(precision, offload, checkpointing, halvings)
            memory[key] = Plan(
                precision=precision,
                offload=offload,
                units_per_group=m,
                groups=groups,
                gradient_checkpointing=checkpointing,
                batch_size=batches[halvings],
                device_gib=row.device_gib,
                host_gib=row.host_gib,
                disk_gib=row.disk_gib,
                peak_group=row.group,
                relative_time=groups * step,
                relative_step_time=step,
            )
        return memory[key]

    def fits(p: Plan) -> bool:
        return p.device_gib <= device_gib and (host_gib is None or p.host_gib <= host_gib)

    # Every estimate logs its split and activations: one line per plan would drown the answer.
    with _quiet("hiftune.memory.estimate", "hiftune.memory.activations"):
        best, fastest, least = _search(plan, fits, ms, len(batches))
    return Fit(
        device_gib=device_gib,
        host_gib=host_gib,
        plan=best and _relative(best, fastest),
        fastest=_relative(fastest, fastest),
        least=least and _relative(least, fastest),
    )


def _search(
    plan: Callable[..., Plan], fits: Callable[[Plan], bool], ms: Sequence[int], n_batches: int
) -> tuple[Plan | None, Plan, Plan | None]:
    """The fastest plan that fits, the fastest ignoring the limits, and without the first the
    plan of the least device memory."""
    settings = [
        (precision, offload, checkpointing, halvings)
        for precision in FIT_PRECISIONS
        for offload in OFFLOADS
        for checkpointing in (False, True)
        for halvings in range(n_batches)
    ]
    # Best first: a setting whose fastest (largest m) plan is slower than a found one is skipped.
    settings.sort(key=lambda s: step_time(*s))
    best: Plan | None = None
    for setting in settings:
        if best is not None and step_time(*setting) >= best.relative_time:
            continue
        found = _largest_that_fits(functools.partial(plan, *setting), ms, fits)
        if found is not None and (best is None or found.relative_time < best.relative_time):
            best = found
    fastest = plan(*settings[0], ms[-1])
    least = None
    if best is None:
        # The least device memory: half precision, disk paging, checkpointing, batch 1, m=1.
        least = plan(FIT_PRECISIONS[0], "disk", True, n_batches - 1, ms[0])
    return best, fastest, least


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Raises these loggers to WARNING for the duration."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _largest_that_fits(
    plan: Callable[[int], Plan], ms: Sequence[int], fits: Callable[[Plan], bool]
) -> Plan | None:
    """The plan of the largest m in ``ms`` that fits (memory grows with m), or ``None``."""
    lo, hi, found = 0, len(ms) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        candidate = plan(ms[mid])
        if fits(candidate):
            found, lo = candidate, mid + 1
        else:
            hi = mid - 1
    return found


def _relative(p: Plan, fastest: Plan) -> Plan:
    """``p`` with its times relative to ``fastest``'s."""
    return Plan(
        **{
            **p.to_dict(),
            "relative_time": p.relative_time / fastest.relative_time,
            "relative_step_time": p.relative_step_time / fastest.relative_step_time,
        }
    )
