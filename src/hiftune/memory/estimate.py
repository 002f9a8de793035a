"""Predict the training memory of FPFT and HiFT from a model's architecture alone.

The model is built on the ``meta`` device (shapes, no storage), split into units and groups by
the same :func:`hiftune.engine.units.split_units` / :func:`hiftune.engine.units.group_units` that training uses,
and every figure follows from parameter shapes:

* **weights**: every parameter of the model (buffers such as rotary tables are left out, as in the
  paper). ``fp32``: 4 bytes each; ``mixed`` (standard mixed precision): fp32 masters plus a
  half-precision copy, 6 bytes each; ``mixed-hi`` (HiFT only): 2 bytes each plus 4 bytes per
  parameter of the peak group for its fp32 masters.
* **gradients**: fp32, 4 bytes per trainable parameter of the model (FPFT) or of the peak group
  (HiFT).
* **optimizer state**: measured from the real optimizer class, never from a table. Each optimizer
  is stepped on small proxy tensors of every parameter rank in the model; the bytes of state per
  parameter are fitted as a polynomial (degree <= 2 in each dimension) of the parameter's shape,
  checked on one more shape, and evaluated on the real shapes. This captures Adam's two moments,
  Adafactor's factored row/column vectors for matrices (and full second moment for vectors),
  Adagrad's sum, scalar step counters, and whatever a user's own optimizer keeps.

HiFT's peak is the group whose gradients + state (+ fp32 masters in ``mixed-hi``) are largest; it
is found per optimizer and precision, since e.g. Adafactor's state is not proportional to the
parameter count.

With a batch size and sequence length, the tensors autograd saves for backward are also counted,
by running one forward pass on the ``meta`` device under
:func:`torch.autograd.graph.saved_tensors_hooks` (for HiFT: once per group, with only that group
trainable, keeping the largest). It is an **estimate**: the kernels chosen on a GPU (e.g. flash
attention), temporaries of the backward pass, the allocator's caching and the CUDA context are not
in it.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import itertools
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from functools import cache
from typing import Any

import torch
from torch import nn

from ..engine.config import HiFTConfig
from ..engine.units import Unit, group_name, group_units, split_units

logger = logging.getLogger(__name__)

MiB = 2**20
GiB = 2**30

METHODS = ("fpft", "hift")
PRECISIONS = ("fp32", "mixed", "mixed-hi")
#: Precisions only HiFT has: hierarchical mixed precision (fp32 masters of the active group only).
HIFT_ONLY_PRECISIONS = ("mixed-hi",)


def _adafactor() -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    from transformers.optimization import Adafactor

    # The class defaults (relative step, parameter scaling, beta1=None: no first moment), which
    # is also what the Hugging Face Trainer uses for optim="adafactor".
    return Adafactor, {}


#: Optimizer name -> factory of ``(class, kwargs)``: the classes whose state is measured.
OPTIMIZERS: dict[str, Callable[[], tuple[type[torch.optim.Optimizer], dict[str, Any]]]] = {
    "adamw": lambda: (torch.optim.AdamW, {"lr": 1e-5}),
    "sgdm": lambda: (torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9}),
    "sgd": lambda: (torch.optim.SGD, {"lr": 1e-3}),
    "adafactor": _adafactor,
    "adagrad": lambda: (torch.optim.Adagrad, {"lr": 1e-3}),
}

# Bytes per element.
_FP32 = 4
_HALF = 2


@dataclass(frozen=True)
class EstimateRow:
    """Predicted memory of one (method, optimizer, precision) before activations.

    Attributes:
        method: ``"fpft"`` (standard full fine-tuning) or ``"hift"``.
        optimizer: Optimizer name, e.g. ``"adamw"``.
        precision: ``"fp32"``, ``"mixed"`` or ``"mixed-hi"``.
        trainable_params: Parameters updated at the peak: the whole model (FPFT) or the peak group
            (HiFT).
        weights_mib: Model weights (and fp32 masters) resident on the device, MiB.
        grads_mib: Gradients at the peak, MiB.
        states_mib: Optimizer state at the peak, MiB.
        group: Which group sets HiFT's peak (``"all"`` for FPFT).
        activations_mib_estimate: Estimated saved activations at the peak, MiB, when a batch size
            and sequence length were given; else ``None``.
    """

    method: str
    optimizer: str
    precision: str
    trainable_params: int
    weights_mib: float
    grads_mib: float
    states_mib: float
    group: str = "all"
    activations_mib_estimate: float | None = None

    @property
    def total_gib(self) -> float:
        """Weights + gradients + optimizer state, GiB (activations not included)."""
        return (self.weights_mib + self.grads_mib + self.states_mib) / 1024

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON-ready values; the activation key only when it was estimated."""
        out = asdict(self)
        del out["group"]
        if out["activations_mib_estimate"] is None:
            del out["activations_mib_estimate"]
        return out


# --- optimizer state, measured from the real class -------------------------------------------

#: Proxy sizes per dimension: three nodes fit a polynomial of degree <= 2 in each dimension
#: exactly (linear: SGD momentum, Adam; sums of dims: Adafactor; squares: Shampoo-like
#: preconditioners). All >= 2 so that no dimension looks like a broadcast dimension.
_NODES = (2, 3, 5)
_MAX_RANK = 5


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
        ValueError: If the optimizer cannot be stepped on plain tensors, or its state is not a
            polynomial of degree <= 2 in each dimension of the parameter's shape.
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

    def bytes(self, shape: Sequence[int]) -> int:
        """Bytes of state the optimizer keeps for one fp32 parameter of ``shape``."""
        shape = tuple(int(d) for d in shape)
        if shape not in self._cache:
            if len(shape) not in self._grid:
                self._fit(len(shape))
            size = _interpolate(self._grid[len(shape)], shape)
            if size.denominator != 1 or size < 0:  # only a fit that passed its check gets here
                raise ValueError(
                    f"the state size of {self.name} interpolates to {size} bytes for shape "
                    f"{shape}: not a whole number of bytes"
                )
            self._cache[shape] = int(size)
        return self._cache[shape]

    def _fit(self, rank: int) -> None:
        if rank > _MAX_RANK:
            raise ValueError(
                f"cannot size {self.name}'s state for a parameter of rank {rank} (at most "
                f"{_MAX_RANK} is supported)"
            )
        grid = list(itertools.product(_NODES, repeat=rank))
        check = tuple((7, 4, 6, 9, 8)[:rank])
        measured = self._measure([*grid, check])
        self._grid[rank] = {s: measured[i] for i, s in enumerate(grid)}
        predicted = _interpolate(self._grid[rank], check)
        if predicted != measured[-1]:
            raise ValueError(
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
            raise ValueError(
                f"cannot measure the state of {self.name} by stepping it on plain tensors: "
                f"{type(e).__name__}: {e}"
            ) from e
        return [_tensor_bytes(opt.state.get(p, {})) for p in params]


def _tensor_bytes(obj: Any) -> int:
    """Bytes of all tensors in a (nested) optimizer-state value."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0  # Python scalars (e.g. Adafactor's step counter) live on the host, not the device


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


def resolve_optimizer(name: str) -> tuple[str, StateSizer]:
    """A :class:`StateSizer` for a named optimizer or a dotted class path.

    Args:
        name: One of :data:`OPTIMIZERS`, or ``"package.module.Class"`` of any optimizer class
            whose defaults need no arguments.

    Raises:
        ValueError: If the name is unknown or the class cannot be imported.
    """
    if name in OPTIMIZERS:
        cls, kwargs = OPTIMIZERS[name]()
        return name, StateSizer(cls, kwargs, name)
    module, _, attr = name.rpartition(".")
    if not module:
        raise ValueError(
            f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)} or a dotted class "
            "path such as torch.optim.RMSprop"
        )
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import optimizer class {name!r}: {e}") from None
    return name, StateSizer(cls, {}, name)


# --- the estimate ------------------------------------------------------------------------------


def build_meta_model(model: str | Any, task: str = "causal-lm", num_labels: int = 2) -> nn.Module:
    """Builds a model on the ``meta`` device from a preset, ``config.json`` path or config object.

    Raises:
        ValueError: For an unknown preset, an unreadable path, or a task the architecture lacks.
    """
    from .configs import build_model, resolve_config

    config = resolve_config(model) if isinstance(model, str) else copy.deepcopy(model)
    return build_model(config, task=task, num_labels=num_labels, device="meta")


def estimate(
    model: nn.Module | str | Any,
    *,
    units_per_group: int = 1,
    optimizers: Iterable[str] | None = None,
    precisions: Iterable[str] | None = None,
    config: HiFTConfig | None = None,
    task: str = "causal-lm",
    num_labels: int = 2,
    batch_size: int | None = None,
    seq_len: int | None = None,
) -> list[EstimateRow]:
    """Predicts the memory of FPFT and HiFT for each optimizer and precision.

    Args:
        model: An ``nn.Module`` (ideally on the ``meta`` device; only shapes are read), a preset
            name, a path to a ``config.json`` (or its directory), or a ``transformers`` config.
        units_per_group: m, units per HiFT group.
        optimizers: Names from :data:`OPTIMIZERS` or dotted class paths; default: all of
            :data:`OPTIMIZERS`.
        precisions: Subset of :data:`PRECISIONS`; default: all. ``"mixed-hi"`` yields HiFT rows
            only.
        config: Unit-split overrides (``units`` / ``blocks``); its ``units_per_group`` is replaced
            by ``units_per_group``.
        task: ``"causal-lm"`` or ``"seq-cls"``: the head to build from a name or config, and the
            inputs of the activation estimate.
        num_labels: Classes of a ``"seq-cls"`` head.
        batch_size: With ``seq_len``, also estimate saved activations (needs a meta model).
        seq_len: Sequence length of the activation estimate.

    Returns:
        One row per (method, optimizer, precision): FPFT rows first, then HiFT, in the order of
        ``optimizers`` and ``precisions``.

    Raises:
        ValueError: For unknown names, bad sizes, or a model the unit split cannot handle.
    """
    if not isinstance(model, nn.Module):
        model = build_meta_model(model, task, num_labels)
    optimizers = list(optimizers) if optimizers is not None else list(OPTIMIZERS)
    precisions = list(precisions) if precisions is not None else list(PRECISIONS)
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {p!r}")
    if not optimizers or not precisions:
        raise ValueError("give at least one optimizer and one precision")
    if (batch_size is None) != (seq_len is None):
        raise ValueError("give both batch_size and seq_len for an activation estimate, or neither")
    for field_name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{field_name} must be an integer >= 1, got {v!r}")

    base = config or HiFTConfig()
    hift_config = HiFTConfig(**{**base.to_dict(), "units_per_group": units_per_group})
    units = split_units(model, hift_config)
    groups = group_units(units, units_per_group)
    named = dict(model.named_parameters())  # deduplicated: a tied weight appears once
    all_params = sum(p.numel() for p in named.values())
    trainable = [n for n, p in named.items() if p.requires_grad]
    group_params = [[n for u in g for n in u.params] for g in groups]
    logger.info(
        "%s: %.2fM parameters, %d units, %d groups of m=%d",
        type(model).__name__,
        all_params / 1e6,
        len(units),
        len(groups),
        units_per_group,
    )

    activations = (
        _activation_estimates(model, groups, precisions, task, num_labels, batch_size, seq_len)
        if batch_size is not None and seq_len is not None
        else None
    )

    fpft: list[EstimateRow] = []
    hift: list[EstimateRow] = []
    for opt_name in optimizers:
        label, sizer = resolve_optimizer(opt_name)
        state_of = {n: sizer.bytes(named[n].shape) for n in trainable}
        count = {n: named[n].numel() for n in trainable}
        for precision in precisions:
            act = activations[precision] if activations else None
            if precision not in HIFT_ONLY_PRECISIONS:
                weight_bytes = all_params * (_FP32 + _HALF if precision == "mixed" else _FP32)
                n_train = sum(count.values())
                fpft.append(
                    EstimateRow(
                        method="fpft",
                        optimizer=label,
                        precision=precision,
                        trainable_params=n_train,
                        weights_mib=weight_bytes / MiB,
                        grads_mib=n_train * _FP32 / MiB,
                        states_mib=sum(state_of.values()) / MiB,
                        activations_mib_estimate=act[0] if act else None,
                    )
                )
            # The group with the most bytes of its own (masters + grads + state) sets the peak.
            masters = _FP32 if precision == "mixed-hi" else 0
            own = [
                sum(count[n] * (masters + _FP32) + state_of[n] for n in names)
                for names in group_params
            ]
            peak = own.index(max(own))  # the first of equals, bottom-up
            n_peak = sum(count[n] for n in group_params[peak])
            if precision == "mixed-hi":
                weight_bytes = all_params * _HALF + n_peak * _FP32
            elif precision == "mixed":
                weight_bytes = all_params * (_FP32 + _HALF)
            else:
                weight_bytes = all_params * _FP32
            hift.append(
                EstimateRow(
                    method="hift",
                    optimizer=label,
                    precision=precision,
                    trainable_params=n_peak,
                    weights_mib=weight_bytes / MiB,
                    grads_mib=n_peak * _FP32 / MiB,
                    states_mib=sum(state_of[n] for n in group_params[peak]) / MiB,
                    group=group_name(groups[peak]),
                    activations_mib_estimate=act[1] if act else None,
                )
            )
    return fpft + hift


# --- activations (an estimate) ----------------------------------------------------------------


def _activation_estimates(
    model: nn.Module,
    groups: Sequence[tuple[Unit, ...]],
    precisions: Sequence[str],
    task: str,
    num_labels: int,
    batch_size: int,
    seq_len: int,
) -> dict[str, tuple[float, float]]:
    """Precision -> (FPFT, HiFT peak) saved-for-backward MiB, from meta-device forward passes."""
    if any(not p.is_meta for p in model.parameters()):
        raise ValueError(
            "the activation estimate runs forward passes and needs a model on the meta device "
            "(build it with hiftune.memory.configs.build_model(..., device='meta'))"
        )
    out: dict[str, tuple[float, float]] = {}
    by_dtype: dict[torch.dtype, tuple[float, float]] = {}
    for precision in precisions:
        # Mixed precision computes (mostly) in half precision: count half-precision activations.
        dtype = torch.float32 if precision == "fp32" else torch.float16
        if dtype not in by_dtype:
            probe = copy.deepcopy(model).to(dtype)
            probe.train()  # training keeps dropout masks
            config = getattr(probe, "config", None)
            if task == "seq-cls" and config is not None and config.pad_token_id is None:
                # Classification heads pool at the last non-pad token and refuse batches > 1
                # without a pad id; the id's value does not change what is saved.
                config.pad_token_id = 0
            names = [[n for u in g for n in u.params] for g in groups]
            fpft = _saved_bytes(probe, None, task, num_labels, batch_size, seq_len)
            hift = max(_saved_bytes(probe, g, task, num_labels, batch_size, seq_len) for g in names)
            by_dtype[dtype] = (fpft / MiB, hift / MiB)
            logger.info(
                "activation estimate (%s, batch %d x %d): FPFT %.0f MiB, HiFT peak %.0f MiB",
                dtype,
                batch_size,
                seq_len,
                *by_dtype[dtype],
            )
        out[precision] = by_dtype[dtype]
    return out


def _saved_bytes(
    model: nn.Module,
    active: list[str] | None,
    task: str,
    num_labels: int,
    batch_size: int,
    seq_len: int,
) -> int:
    """Bytes autograd saves in one forward with ``active`` (``None``: all) parameters trainable."""
    named = dict(model.named_parameters())
    trainable = set(named) if active is None else set(active)
    for n, p in named.items():
        p.requires_grad_(n in trainable)
    # Weights saved for backward are already counted as weights; count each storage once.
    weights = {p.untyped_storage()._cdata for p in named.values()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return t

    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    labels = torch.zeros(batch_size, dtype=torch.long, device="meta") if task == "seq-cls" else ids
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=labels)
    except Exception as e:  # a model that cannot run on meta: say so instead of guessing
        raise ValueError(
            f"cannot estimate activations of {type(model).__name__} on the meta device: "
            f"{type(e).__name__}: {e} (leave out batch_size/seq_len for the other figures)"
        ) from e
    return sum(saved.values())


# --- the command line ---------------------------------------------------------------------------


def _csv(choices: Sequence[str] | None) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        for s in items:
            if choices is not None and s not in choices:
                raise argparse.ArgumentTypeError(
                    f"invalid choice {s!r} (choose from {', '.join(choices)})"
                )
        return items

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the arguments of ``hiftune estimate``."""
    from .configs import CONFIGS, HEADS

    parser.add_argument(
        "model",
        metavar="MODEL",
        help=f"a preset ({', '.join(CONFIGS)}) or a Hugging Face config.json (file or directory)",
    )
    parser.add_argument("--task", choices=HEADS, default="causal-lm", help="head to build")
    parser.add_argument(
        "--num-labels", type=int, default=2, help="classes of the seq-cls head (default 2)"
    )
    parser.add_argument(
        "--units-per-group", "-m", type=int, default=1, help="m, units per HiFT group (default 1)"
    )
    parser.add_argument(
        "--optimizer",
        type=_csv(None),
        action="extend",
        help=f"only these optimizers, comma-separated: {', '.join(OPTIMIZERS)} or a dotted "
        "class path such as torch.optim.RMSprop (default: all named ones)",
    )
    parser.add_argument(
        "--precision",
        type=_csv(PRECISIONS),
        action="extend",
        help=f"only these precisions, comma-separated: {', '.join(PRECISIONS)} (default: all)",
    )
    parser.add_argument(
        "--batch-size", type=int, help="with --seq-len: also estimate saved activations"
    )
    parser.add_argument("--seq-len", type=int, help="with --batch-size: sequence length")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")


def run(args: argparse.Namespace) -> int:
    """Runs ``hiftune estimate``: prints a table (or JSON) to stdout."""
    from ..errors import UserError, first_line
    from .report import markdown_table

    if args.num_labels < 1:
        raise UserError(f"--num-labels must be >= 1, got {args.num_labels}")
    if args.units_per_group < 1:
        raise UserError(f"--units-per-group must be >= 1, got {args.units_per_group}")
    try:
        model = build_meta_model(args.model, args.task, args.num_labels)
        rows = estimate(
            model,
            units_per_group=args.units_per_group,
            optimizers=args.optimizer,
            precisions=args.precision,
            task=args.task,
            num_labels=args.num_labels,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
        )
    except ValueError as e:
        raise UserError(first_line(e)) from None

    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    with_act = rows[0].activations_mib_estimate is not None
    table = []
    for r in rows:
        line = {
            "method": r.method.upper() if r.method == "fpft" else "HiFT",
            "optimizer": r.optimizer,
            "precision": r.precision,
            "peak group": r.group,
            "peak trainable": f"{r.trainable_params / 1e6:,.2f}M",
            "weights MiB": r.weights_mib,
            "grads MiB": r.grads_mib,
            "states MiB": r.states_mib,
            "total GiB": r.total_gib,
        }
        if with_act and r.activations_mib_estimate is not None:
            line["activations MiB (estimate)"] = r.activations_mib_estimate
            line["total + act. GiB (estimate)"] = r.total_gib + r.activations_mib_estimate / 1024
        table.append(line)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.model} ({args.task}): {n_params / 1e6:,.2f}M parameters, "
        f"m={args.units_per_group}; MiB = 2^20 bytes, GiB = 2^30 bytes; total = weights + grads "
        "+ optimizer states (before activations)."
    )
    print()
    print(markdown_table(table), end="")
    if with_act:
        print()
        print(
            f"Activations (batch {args.batch_size} x {args.seq_len}) are an estimate: tensors "
            "saved for backward in one forward pass on the meta device (HiFT: the largest over "
            "groups); GPU kernels, backward temporaries and allocator overhead are not included."
        )
    return 0
