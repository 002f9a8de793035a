"""Predicting the memory of each rank when HiFT trains on N processes.

Three modes (``docs/distributed.md``):

* ``dp``: data parallelism. Every rank holds the whole model, the active group's gradients (HiFT
  averages them itself, no DDP buckets), and the optimizer state and fp32 masters of every group:
  the active group's on the device during its step, the others paged (host or disk).
* ``sharded``: data parallelism with ``HiFTConfig(shard_state=True)``. As ``dp`` on the device,
  but group ``b``'s paged state lives only on rank ``b % N`` (its owner, the only rank that steps
  it), so the paged state per rank drops about N times.
* ``fsdp2``: the model's blocks sharded with FSDP2 (:func:`hiftune.engine.fsdp.shard_by_units`).
  Weights, gradients, state and masters are all ``1/N`` per rank, plus the unsharded weights of
  the unit being computed (FSDP2 all-gathers one FSDP module at a time, and prefetches the next),
  plus the unsharded gradients of the unit whose backward runs, until they are reduce-scattered.

Byte counts follow :mod:`hiftune.memory.estimate`: weights of 4 bytes (2 in ``bf16``/``fp16``,
hierarchical mixed precision, plus 4-byte masters of the active group), 4-byte gradients, optimizer
state measured from the real optimizer class; activations are not included. Communication is the
bytes one rank sends per optimizer step with ring collectives.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..engine.config import PRECISIONS, HiFTConfig
from ..engine.fsdp import fsdp_units
from ..engine.split.units import group_name, group_units, split_units, unit_numel
from ..errors import UserError, first_line
from .estimate import build_meta_model
from .state_sizer import StateSizer

MiB = 2**20

#: The distributed modes, in ``hiftune estimate --mode`` and ``docs/distributed.md``.
DISTRIBUTED_MODES = ("dp", "sharded", "fsdp2")

_FP32 = 4
_HALF = 2


@dataclass(frozen=True)
class RankEstimate:
    """Predicted memory of one rank at its peak optimizer step (activations not included).

    Attributes:
        rank: The rank, 0 to ``processes - 1``.
        processes: N, the number of processes.
        mode: One of :data:`DISTRIBUTED_MODES`.
        optimizer: Optimizer name.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        group: The group whose step sets this rank's peak.
        device_weights_mib: Weights (and the peak group's fp32 masters) on the device, MiB;
            in ``fsdp2`` the local shards plus the largest unit all-gathered.
        device_grads_mib: Gradients on the device at the peak, MiB.
        device_states_mib: Optimizer state on the device at the peak (the stepping group's), MiB.
        paged_mib: The other groups' optimizer state and fp32 masters this rank keeps paged (on
            host or disk, as ``HiFTConfig.offload`` says), MiB.
        comm_mib_per_step: Bytes this rank sends in the peak step's collectives, MiB.
    """

    rank: int
    processes: int
    mode: str
    optimizer: str
    precision: str
    group: str
    device_weights_mib: float
    device_grads_mib: float
    device_states_mib: float
    paged_mib: float
    comm_mib_per_step: float

    @property
    def device_mib(self) -> float:
        """Weights + gradients + optimizer state on the device, MiB."""
        return self.device_weights_mib + self.device_grads_mib + self.device_states_mib

    @property
    def total_mib(self) -> float:
        """Device plus paged memory, MiB: the figure to compare on a CPU, where both are RAM."""
        return self.device_mib + self.paged_mib


@dataclass(frozen=True)
class _Group:
    name: str
    params: int  # parameters trained by the group
    state: int  # optimizer state bytes
    module_weights: int  # parameters of the largest FSDP2 module the group lies in


def estimate_per_rank(
    model: nn.Module | str | Any,
    *,
    processes: int,
    mode: str = "dp",
    optimizer: str = "adamw",
    precision: str = "fp32",
    units_per_group: int = 1,
    config: HiFTConfig | None = None,
    task: str = "causal-lm",
    num_labels: int = 2,
) -> list[RankEstimate]:
    """Predicts each rank's memory for HiFT on ``processes`` processes in ``mode``.

    Args:
        model: An ``nn.Module`` (ideally on ``meta``), a preset name, a ``config.json`` path or a
            ``transformers`` config, as for :func:`hiftune.memory.estimate.estimate`.
        processes: N >= 1.
        mode: One of :data:`DISTRIBUTED_MODES`.
        optimizer: A name of :data:`hiftune.engine.optimizers.OPTIMIZERS` or a class path.
        precision: One of :data:`hiftune.engine.config.PRECISIONS`.
        units_per_group: m.
        config: Unit-split overrides; its ``units_per_group`` is replaced by ``units_per_group``.
        task: Which head to build from a name or config.
        num_labels: Classes of a ``seq-cls`` head.

    Returns:
        One :class:`RankEstimate` per rank (they differ in ``sharded`` mode, where each rank owns
        other groups); the largest ``total_mib`` is the one to provision for.

    Raises:
        UserError: For a bad number of processes, mode or precision, or a model the unit split
            cannot handle.
    """
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise UserError(f"processes must be an integer >= 1, got {processes!r}")
    if mode not in DISTRIBUTED_MODES:
        raise UserError(f"mode must be one of {', '.join(DISTRIBUTED_MODES)}; got {mode!r}")
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if mode == "sharded" and precision != "fp32":
        raise UserError("sharded state (shard_state=True) trains in precision fp32 only")
    if not isinstance(model, nn.Module):
        model = build_meta_model(model, task, num_labels)
    base = config or HiFTConfig()
    hift_config = HiFTConfig(**{**base.to_dict(), "units_per_group": units_per_group})
    groups, all_params = _groups(
        model, hift_config, StateSizer.from_name(optimizer), mode, precision
    )
    half = precision != "fp32"
    weight_bytes = _HALF if half else _FP32
    master_bytes = _FP32 if half else 0
    n = processes
    ring = 2 * (n - 1) / n  # bytes sent per byte all-reduced; half that for one gather/scatter
    out = []
    for rank in range(n):
        best: tuple[float, RankEstimate] | None = None
        for b, g in enumerate(groups):
            paged = sum(h.state + h.params * master_bytes for h in groups) - (
                g.state + g.params * master_bytes
            )
            grads = g.params * _FP32
            state = g.state
            weights = all_params * weight_bytes + g.params * master_bytes
            comm = ring * grads
            if mode == "sharded":
                owns = b % n == rank
                paged = sum(
                    h.state + h.params * master_bytes
                    for i, h in enumerate(groups)
                    if i % n == rank and i != b
                )
                state = state if owns else 0
                comm += g.params * weight_bytes * (n - 1) / n  # the owner's broadcast
            elif mode == "fsdp2":
                # Local shards of everything, plus the largest module all-gathered (twice: FSDP2
                # prefetches the next module while one computes) and the active unit's full
                # gradients until they are reduce-scattered.
                biggest = max(h.module_weights for h in groups)  # blocks, or the root's rest
                gathered = 2 * biggest if n > 1 else 0  # one process all-gathers nothing
                weights = math.ceil(all_params / n) * weight_bytes + gathered * weight_bytes
                weights += math.ceil(g.params * master_bytes / n)
                grads = math.ceil(grads / n) + (g.module_weights * _FP32 if n > 1 else 0)
                state = math.ceil(state / n)
                paged = math.ceil(paged / n)
                # Forward and backward all-gather every module once; the group's gradients are
                # reduce-scattered once.
                comm = (2 * all_params * weight_bytes + g.params * _FP32) * (n - 1) / n
            row = RankEstimate(
                rank=rank,
                processes=n,
                mode=mode,
                optimizer=optimizer,
                precision=precision,
                group=g.name,
                device_weights_mib=weights / MiB,
                device_grads_mib=grads / MiB,
                device_states_mib=state / MiB,
                paged_mib=paged / MiB,
                comm_mib_per_step=comm / MiB,
            )
            if best is None or row.total_mib > best[0]:
                best = (row.total_mib, row)
        assert best is not None  # a model has at least one group
        out.append(best[1])
    return out


def _groups(
    model: nn.Module, config: HiFTConfig, sizer: StateSizer, mode: str, precision: str
) -> tuple[list[_Group], int]:
    try:  # the engine reports a bad m or a model it cannot split as ValueError
        if mode == "fsdp2":  # the split FSDP2 training uses: no row shards, fp32 only
            units = fsdp_units(model, dataclasses.replace(config, precision=precision))  # type: ignore[arg-type]
        else:
            units = split_units(model, config)
        param_shapes = {n: p.shape for n, p in model.named_parameters()}
        sizes = [unit_numel(u, param_shapes) for u in units]
        grouped = group_units(units, config.units_per_group, config.group_by, sizes)
    except ValueError as e:
        raise UserError(first_line(e)) from None
    named = dict(model.named_parameters())
    all_params = sum(p.numel() for p in named.values())
    # FSDP2 modules as shard_by_units makes them: each block, then the root with the rest.
    blocks = {u.module for u in units if u.module is not None}
    module_params = {m: sum(p.numel() for p in model.get_submodule(m).parameters()) for m in blocks}
    root = all_params - sum(module_params.values())
    groups = []
    for g in grouped:
        shapes = [u.part_shape(name, named[name].shape) for u in g for name in u.params]
        groups.append(
            _Group(
                name=group_name(g),
                params=sum(math.prod(s) for s in shapes),
                state=sum(sizer.bytes(s) for s in shapes),
                module_weights=max(module_params.get(u.module, root) for u in g),  # type: ignore[arg-type]
            )
        )
    return groups, all_params
