"""Predict the training memory of FPFT and HiFT from a model's architecture alone.

The model is built on the ``meta`` device (shapes, no storage), split into units and groups by
the same :func:`hiftune.engine.split.units.split_units` / :func:`hiftune.engine.split.units.group_units` that
training uses, and every figure follows from parameter shapes.

Precisions are the names every hiftune command uses (``fp32``, ``bf16``, ``fp16``). What a half
precision means for memory depends on the method, so each row also names its **mode**, in the
paper's terms:

* ``fp32``: 4 bytes per weight.
* ``mixed`` (FPFT in ``bf16``/``fp16``: standard mixed precision): fp32 masters of every weight
  plus a half-precision copy, 6 bytes per weight. The paper also tabulates HiFT under it
  (``hift_mixed="standard"`` or ``"both"``), though hiftune does not train that way.
* ``mixed^Hi`` (HiFT in ``bf16``/``fp16``: hierarchical mixed precision, what
  ``HiFTOptimizer(precision="bf16")`` does): 2 bytes per weight plus 4 bytes per parameter of the
  peak group for its fp32 masters.

Gradients are fp32, 4 bytes per trainable parameter of the model (FPFT) or of the peak group
(HiFT). A group that trains row shards of a parameter (a vocabulary split by
``HiFTConfig.max_unit_params``) counts its rows everywhere. Where a module owning the parameter
cannot be run under row gradients (:mod:`hiftune.engine.rowgrad`: e.g. an embedding with
``max_norm``), backward computes its full-size gradient in the weights' dtype before the shard's
rows are taken out of it, and that is counted too (an upper bound: it is freed before the
optimizer step); a use of the weight outside its modules or other than by ``F.embedding`` /
``F.linear`` is not seen here and not counted. Optimizer
state is measured from the real optimizer class
(:class:`~hiftune.memory.state_sizer.StateSizer`), never from a table. HiFT's peak is the group
whose gradients + state (+ fp32 masters in ``mixed^Hi``) are largest; it is found per optimizer
and mode, since e.g. Adafactor's state is not proportional to the parameter count. Buffers (rotary
tables) are left out, as in the paper.

With a batch size and sequence length, the tensors autograd saves for backward are also counted,
by running one forward pass on the ``meta`` device under
:func:`torch.autograd.graph.saved_tensors_hooks` (for HiFT: once per group, with only that group
trainable, keeping the largest). It is an **estimate**: the kernels chosen on a GPU (e.g. flash
attention), temporaries of the backward pass, the allocator's caching and the CUDA context are not
in it. The loss's logits are a component of their own, and gradient checkpointing is counted as
Hugging Face applies it (:mod:`hiftune.memory.activations`).

Where HiFT's optimizer state and fp32 masters live follows ``offload``: with ``"none"`` every
group's stay on the device; with ``"host"`` or ``"disk"`` the device holds the active group's and
every group's are paged (:attr:`EstimateRow.paged_mib`). :mod:`hiftune.memory.fit` searches these
choices for a plan that fits.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from ..engine.config import OFFLOADS, PRECISIONS, HiFTConfig
from ..engine.optimizers import METHODS, OPTIMIZERS
from ..engine.rowgrad import row_gradient_names
from ..engine.split.units import Unit, group_name, group_units, split_model, unit_numel
from ..errors import UserError, first_line
from .activations import PassCache, activation_estimates
from .configs import build_model, head_of, resolve_config
from .render import markdown_table
from .state_sizer import StateSizer

logger = logging.getLogger(__name__)

MiB = 2**20
GiB = 2**30

#: Precisions estimated when none are given; ``fp16`` needs exactly the memory of ``bf16``.
DEFAULT_PRECISIONS = ("fp32", "bf16")
#: What a row's weights are, in the paper's terms (see the module docstring).
MODES = ("fp32", "mixed", "mixed^Hi")
#: Which mixed precision HiFT's ``bf16``/``fp16`` rows assume: ``"hi"`` (mixed^Hi, what hiftune
#: trains), ``"standard"`` (fp32 masters of every weight) or ``"both"`` (the paper's full table).
HIFT_MIXED = ("hi", "standard", "both")

# Bytes per element.
_FP32 = 4
_HALF = 2


def modes(method: str, precision: str, hift_mixed: str = "hi") -> tuple[str, ...]:
    """The modes (:data:`MODES`) of the rows for one method and precision.

    ``fp32`` is ``fp32`` for both methods; a half precision is standard ``mixed`` for FPFT and,
    for HiFT, ``mixed^Hi`` and/or ``mixed`` as ``hift_mixed`` says.

    Raises:
        UserError: For a method, precision or ``hift_mixed`` value outside its vocabulary.
    """
    for what, value, allowed in (
        ("method", method, METHODS),
        ("precision", precision, PRECISIONS),
        ("hift_mixed", hift_mixed, HIFT_MIXED),
    ):
        if value not in allowed:
            raise UserError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
    if precision == "fp32":
        return ("fp32",)
    if method == "fpft":
        return ("mixed",)
    return {"hi": ("mixed^Hi",), "standard": ("mixed",), "both": ("mixed", "mixed^Hi")}[hift_mixed]


@dataclass(frozen=True)
class EstimateRow:
    """Predicted memory of one (method, optimizer, precision, mode) before activations.

    Attributes:
        method: ``"fpft"`` (standard full fine-tuning) or ``"hift"``.
        optimizer: Optimizer name, e.g. ``"adamw"``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        mode: ``"fp32"``, ``"mixed"`` (fp32 masters of every weight) or ``"mixed^Hi"`` (fp32
            masters of the active group only).
        trainable_params: Parameters updated at the peak: the whole model (FPFT) or the peak group
            (HiFT).
        weights_mib: Model weights (and fp32 masters) resident on the device, MiB.
        grads_mib: Gradients at the peak, MiB.
        states_mib: Optimizer state at the peak, MiB.
        group: Which group sets HiFT's peak (``"all"`` for FPFT).
        activations_mib_estimate: Estimated saved activations at the peak, MiB, when a batch size
            and sequence length were given; else ``None``. The logits are not in it.
        logits_mib_estimate: The loss's logits at the peak (saved, and their fp32 gradient),
            MiB, with the activations; else ``None``.
        gradient_checkpointing: Whether the activations are counted as Hugging Face's gradient
            checkpointing keeps them.
        offload: Where HiFT keeps its paged optimizer state and fp32 masters: ``"none"`` (on the
            device: counted in ``weights_mib`` and ``states_mib``), ``"host"`` or ``"disk"``
            (``paged_mib``). ``"none"`` for FPFT.
        paged_mib: Every group's optimizer state and fp32 masters as paged out to host memory
            or disk, MiB (0 with ``offload="none"`` and for FPFT).
    """

    method: str
    optimizer: str
    precision: str
    mode: str
    trainable_params: int
    weights_mib: float
    grads_mib: float
    states_mib: float
    group: str = "all"
    activations_mib_estimate: float | None = None
    logits_mib_estimate: float | None = None
    gradient_checkpointing: bool = False
    offload: str = "none"
    paged_mib: float = 0.0

    @property
    def total_gib(self) -> float:
        """Weights + gradients + optimizer state on the device, GiB (activations not included)."""
        return (self.weights_mib + self.grads_mib + self.states_mib) / 1024

    @property
    def device_gib(self) -> float:
        """Everything on the device: :attr:`total_gib` + activations + logits (as estimated)."""
        extra = (self.activations_mib_estimate or 0.0) + (self.logits_mib_estimate or 0.0)
        return self.total_gib + extra / 1024

    @property
    def host_gib(self) -> float:
        """Paged optimizer state and fp32 masters in host memory, GiB."""
        return self.paged_mib / 1024 if self.offload == "host" else 0.0

    @property
    def disk_gib(self) -> float:
        """Paged optimizer state and fp32 masters on disk, GiB."""
        return self.paged_mib / 1024 if self.offload == "disk" else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON-ready values (``group`` as ``peak_group``, plus ``device_gib``,
        ``host_gib`` and ``disk_gib``); the activation and logit keys only when estimated."""
        out = asdict(self)
        out["peak_group"] = out.pop("group")
        for key in ("activations_mib_estimate", "logits_mib_estimate"):
            if out[key] is None:
                del out[key]
        out.update(device_gib=self.device_gib, host_gib=self.host_gib, disk_gib=self.disk_gib)
        return out


# --- the estimate ------------------------------------------------------------------------------


def build_meta_model(model: str | Any, task: str = "causal-lm", num_labels: int = 2) -> nn.Module:
    """Builds a model on the ``meta`` device from a preset, ``config.json`` path or config object.

    Args:
        model: A preset of :data:`~hiftune.memory.configs.CONFIGS`, a path to a ``config.json``
            (or its directory), or a ``transformers`` config (copied, not changed).
        task: A task of :data:`~hiftune.memory.configs.TASK_HEADS`: which head to build (a head
            of :data:`~hiftune.memory.configs.HEADS` or a ``hiftune train`` task).
        num_labels: Classes of a ``seq-cls`` or ``image-cls`` head.

    Raises:
        UserError: For an unknown preset, an unreadable path, or a task the architecture lacks.
    """
    if num_labels < 1:
        raise UserError(f"num_labels must be >= 1, got {num_labels}")
    config = resolve_config(model) if isinstance(model, str) else copy.deepcopy(model)
    return build_model(config, task=task, num_labels=num_labels, device="meta")


def estimate(
    model: nn.Module | str | Any,
    *,
    units_per_group: int = 1,
    optimizers: Iterable[str] | None = None,
    precisions: Iterable[str] | None = None,
    hift_mixed: str = "hi",
    config: HiFTConfig | None = None,
    task: str = "causal-lm",
    num_labels: int = 2,
    batch_size: int | None = None,
    seq_len: int | None = None,
    gradient_checkpointing: bool = False,
    offload: str = "host",
    cache: PassCache | None = None,
) -> list[EstimateRow]:
    """Predicts the memory of FPFT and HiFT for each optimizer and precision.

    Args:
        model: An ``nn.Module`` (ideally on the ``meta`` device; only shapes are read), a preset
            name, a path to a ``config.json`` (or its directory), or a ``transformers`` config.
        units_per_group: m, units per HiFT group.
        optimizers: Names of :data:`hiftune.engine.optimizers.OPTIMIZERS` or dotted class paths;
            default: every named optimizer.
        precisions: Names of :data:`hiftune.engine.config.PRECISIONS`; default
            :data:`DEFAULT_PRECISIONS`. ``bf16``/``fp16`` mean standard mixed precision for FPFT
            and, for HiFT, what ``hift_mixed`` says.
        hift_mixed: One of :data:`HIFT_MIXED`: HiFT's half-precision rows in ``"hi"`` (mixed^Hi,
            as hiftune trains), ``"standard"`` mixed precision, or ``"both"`` (the paper's table).
        config: Unit-split overrides (``units`` / ``blocks``); its ``units_per_group`` is replaced
            by ``units_per_group``.
        task: A task of :data:`~hiftune.memory.configs.TASK_HEADS` (``causal-lm``, ``prompt-cls``,
            ``sft``: a causal LM; any other head of :data:`~hiftune.memory.configs.HEADS`): the
            head to build from a name or config, and the batch of the activation estimate
            (:func:`~hiftune.memory.batches.dummy_batches`).
        num_labels: Classes of a ``seq-cls`` or ``image-cls`` head.
        batch_size: With ``seq_len``, also estimate saved activations (needs a meta model).
        seq_len: Sequence length of the activation estimate.
        gradient_checkpointing: Count activations as Hugging Face's gradient checkpointing
            keeps them (:mod:`hiftune.memory.activations`).
        offload: HiFT's :attr:`HiFTConfig.offload`: ``"none"`` keeps every group's optimizer
            state and fp32 masters on the device; ``"host"`` / ``"disk"`` page them out
            (:attr:`EstimateRow.paged_mib`), keeping the active group's on the device.
        cache: Forward passes of the activation estimate already run on this ``model``
            (:data:`~hiftune.memory.activations.PassCache`), shared between calls.

    Returns:
        One row per (method, optimizer, precision, mode): FPFT rows first, then HiFT, in the order
        of ``optimizers``, ``precisions`` and :data:`MODES`.

    Raises:
        UserError: For unknown names, bad sizes, or a model the unit split cannot handle.
    """
    head = head_of(task)
    if not isinstance(model, nn.Module):
        model = build_meta_model(model, task, num_labels)
    optimizers = list(optimizers) if optimizers is not None else list(OPTIMIZERS)
    precisions = list(precisions) if precisions is not None else list(DEFAULT_PRECISIONS)
    for p in precisions:
        if p not in PRECISIONS:
            raise UserError(
                f"precision must be one of {', '.join(PRECISIONS)}; got {p!r} (standard mixed "
                "precision and mixed^Hi are bf16/fp16 rows, chosen by hift_mixed)"
            )
    if offload not in OFFLOADS:
        raise UserError(f"offload must be one of {', '.join(OFFLOADS)}; got {offload!r}")
    if hift_mixed not in HIFT_MIXED:
        raise UserError(f"hift_mixed must be one of {', '.join(HIFT_MIXED)}; got {hift_mixed!r}")
    if not optimizers or not precisions:
        raise UserError("give at least one optimizer and one precision")
    if (batch_size is None) != (seq_len is None):
        raise UserError("give both batch_size and seq_len for an activation estimate, or neither")
    for field_name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UserError(f"{field_name} must be an integer >= 1, got {v!r}")

    try:  # the engine reports a bad m or a model it cannot split as ValueError
        base = config or HiFTConfig()
        hift_config = HiFTConfig(**{**base.to_dict(), "units_per_group": units_per_group})
        units, always = split_model(model, hift_config)
        shapes = {n: p.shape for n, p in model.named_parameters()}
        sizes = [unit_numel(u, shapes) for u in units]
        groups = group_units(units, units_per_group, hift_config.group_by, sizes)
    except ValueError as e:
        raise UserError(first_line(e)) from None
    named = dict(model.named_parameters())  # deduplicated: a tied weight appears once
    all_params = sum(p.numel() for p in named.values())
    logger.info(
        "%s: %.2fM parameters, %d units, %d groups of m=%d",
        type(model).__name__,
        all_params / 1e6,
        len(units),
        len(groups),
        units_per_group,
    )
    rowgrad = row_gradient_names(model)
    # Candidate peaks per method: FPFT trains everything at once, HiFT one group at a time.
    candidates = {
        "fpft": [("all", [_Part(n, tuple(p.shape)) for n, p in named.items() if p.requires_grad])],
        # The always-active parameters train beside every group: they are part of every peak.
        "hift": [
            (group_name(g), _parts((*g, *([always] if always else [])), named, rowgrad))
            for g in groups
        ],
    }

    activations = (
        activation_estimates(
            model, groups, precisions, head, batch_size, seq_len, gradient_checkpointing, cache
        )
        if batch_size is not None and seq_len is not None
        else None
    )
    # What HiFT pages: every group's state and masters (the always-active ones stay put).
    paged_parts = [p for g in groups for p in _parts(g, named, rowgrad)]
    always_parts = _parts([always], named, rowgrad) if always else []

    rows: dict[str, list[EstimateRow]] = {"fpft": [], "hift": []}
    for opt_name in optimizers:
        sizer = StateSizer.from_name(opt_name)
        for method, method_rows in rows.items():
            for precision in precisions:
                act = activations[precision][method] if activations else None
                for mode in modes(method, precision, hift_mixed):
                    group, parts = _peak(candidates[method], mode, named, sizer)
                    n_peak = sum(p.numel for p in parts)
                    masters = _FP32 if mode == "mixed^Hi" else 0
                    states = sum(sizer.bytes(p.shape) for p in parts)
                    paged = sum(p.numel * masters + sizer.bytes(p.shape) for p in paged_parts)
                    # Without paging every group's masters and state stay on the device.
                    extra_masters = extra_states = 0
                    where = offload if method == "hift" else "none"
                    if where == "none" and method == "hift":
                        kept = [*paged_parts, *always_parts]
                        extra_masters = masters * (sum(p.numel for p in kept) - n_peak)
                        extra_states = sum(sizer.bytes(p.shape) for p in kept) - states
                        paged = 0
                    method_rows.append(
                        EstimateRow(
                            method=method,
                            optimizer=opt_name,
                            precision=precision,
                            mode=mode,
                            trainable_params=n_peak,
                            weights_mib=(_weight_bytes(mode, all_params, n_peak) + extra_masters)
                            / MiB,
                            grads_mib=_grad_bytes(mode, parts, named) / MiB,
                            states_mib=(states + extra_states) / MiB,
                            group=group,
                            activations_mib_estimate=act.activations if act else None,
                            logits_mib_estimate=act.logits if act else None,
                            gradient_checkpointing=gradient_checkpointing,
                            offload=where,
                            paged_mib=paged / MiB if method == "hift" else 0.0,
                        )
                    )
    return rows["fpft"] + rows["hift"]


@dataclass(frozen=True)
class _Part:
    """What a group trains of one parameter: all of it, or a row shard whose backward computes
    the parameter's full-size gradient (``full_grad``)."""

    name: str
    shape: tuple[int, ...]
    full_grad: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _parts(group: Sequence[Unit], named: dict[str, nn.Parameter], rowgrad: set[str]) -> list[_Part]:
    return [
        _Part(n, u.part_shape(n, named[n].shape), n in u.rows and n not in rowgrad)
        for u in group
        for n in u.params
    ]


def _grad_bytes(mode: str, parts: Sequence[_Part], named: dict[str, nn.Parameter]) -> int:
    """fp32 gradients of ``parts``, plus the transient full-size gradient of a sharded weight
    without row gradients."""
    full = {p.name for p in parts if p.full_grad}
    weight_bytes = _FP32 if mode == "fp32" else _HALF
    return sum(p.numel for p in parts) * _FP32 + sum(named[n].numel() * weight_bytes for n in full)


def _peak(
    candidates: Sequence[tuple[str, list[_Part]]],
    mode: str,
    named: dict[str, nn.Parameter],
    sizer: StateSizer,
) -> tuple[str, list[_Part]]:
    """The group with the most bytes of its own (fp32 masters + gradients + state)."""
    masters = _FP32 if mode == "mixed^Hi" else 0
    own = [
        sum(p.numel * masters + sizer.bytes(p.shape) for p in parts)
        + _grad_bytes(mode, parts, named)
        for _, parts in candidates
    ]
    return candidates[own.index(max(own))]  # the first of equals, bottom-up


def _weight_bytes(mode: str, all_params: int, peak_params: int) -> int:
    """Bytes of weights on the device: the model's, plus the fp32 masters of mixed precision."""
    if mode == "mixed^Hi":
        return all_params * _HALF + peak_params * _FP32
    if mode == "mixed":
        return all_params * (_FP32 + _HALF)
    return all_params * _FP32


# --- rendering -----------------------------------------------------------------------------------


def render(
    rows: Sequence[EstimateRow],
    *,
    model: str,
    task: str,
    params: int,
    units_per_group: int,
    batch_size: int | None = None,
    seq_len: int | None = None,
    offload: str = "host",
) -> str:
    """The rows as a Markdown table with a title line and, with activations, a note on them.

    Args:
        rows: From :func:`estimate`.
        model: The model's name for the title.
        task: The task the model was built for.
        params: The model's parameter count.
        units_per_group: m, for the title.
        batch_size: The activation estimate's batch size, if any, for the note.
        seq_len: Its sequence length.
        offload: HiFT's offload, for the title.
    """
    with_act = bool(rows) and rows[0].activations_mib_estimate is not None
    table = []
    for r in rows:
        line: dict[str, Any] = {
            "method": "FPFT" if r.method == "fpft" else "HiFT",
            "optimizer": r.optimizer,
            "precision": r.precision,
            "mode": r.mode,
            "peak group": r.group,
            "peak trainable": f"{r.trainable_params / 1e6:,.2f}M",
            "weights MiB": r.weights_mib,
            "grads MiB": r.grads_mib,
            "states MiB": r.states_mib,
            "total GiB": r.total_gib,
        }
        if with_act and r.activations_mib_estimate is not None:
            line["activations MiB (estimate)"] = r.activations_mib_estimate
            line["logits MiB (estimate)"] = r.logits_mib_estimate or 0.0
            line["device GiB (estimate)"] = r.device_gib
        line["host GiB"] = r.host_gib
        line["disk GiB"] = r.disk_gib
        table.append(line)
    text = (
        f"{model} ({task}): {params / 1e6:,.2f}M parameters, m={units_per_group}; "
        "MiB = 2^20 bytes, GiB = 2^30 bytes; total = weights + grads + optimizer states (before "
        "activations) on the device; mode: mixed = fp32 masters of every weight, mixed^Hi = of "
        "the peak group; host/disk = HiFT's optimizer state and fp32 masters paged out "
        f"(offload {offload}).\n\n{markdown_table(table)}"
    )
    if with_act:
        checkpointed = ", with gradient checkpointing" if rows[0].gradient_checkpointing else ""
        text += (
            f"\nActivations (batch {batch_size} x {seq_len}{checkpointed}) are an estimate: "
            "tensors saved for backward in one forward pass on the meta device (HiFT: the largest "
            "over groups); logits = the loss's logits saved (upcast to fp32) and their fp32 "
            "gradient; device = total + activations + logits. GPU kernels, other backward "
            "temporaries and allocator overhead are not included.\n"
        )
    return text
