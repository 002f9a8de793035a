"""The measuring side of ``hiftune profile``: one configuration, trained in this (fresh) process.

:func:`measure_run` trains a randomly initialised model on random tokens and records the peak
memory and the time of every step. :mod:`hiftune.memory.profile` starts this module once per
configuration as ``python -m hiftune.memory.profile_worker SPEC_JSON RESULT_PATH``:

* the peak resident set size of a CPU process cannot be lowered once reached, so runs sharing a
  process would inherit each other's peaks (and allocator caches);
* the worker is started with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` and
  ``MALLOC_TRIM_THRESHOLD_=65536`` (:data:`MALLOC_ENV`, unless already set): every block above
  64 KiB (all real tensors) is then ``mmap``-ed and given back to the kernel when freed. Without
  this glibc keeps freed memory in its heap, and the resident set size measures the allocator's
  history rather than what the training step holds.

Memory is the process's resident set size on CPU (so it includes the Python runtime and the
libraries, reported as ``runtime``) and ``torch.cuda.max_memory_allocated`` on CUDA, read per step
by :class:`~hiftune.memory.measure.PeakMemory`; on CUDA also the caching allocator's peak
reservation (``reserved_peak``: what the device must have free) and the peak pinned host memory
(``pinned_peak``: PyTorch's caching host allocator's plus the host store's own page-locked
buffers), ``None`` on CPU.

The breakdown follows the paper's memory model (method notes, section 7): ``weights`` = bytes of the
model's parameters (plus the fp32 masters resident at once, in mixed precision), ``gradients`` =
the largest bytes of ``.grad`` tensors seen in a step, ``optimizer_states`` = the largest bytes of
optimizer state resident at a step (for HiFT: the active group's, plus every other group's when the
offload keeps them in memory), and ``rest`` = peak minus those three: activations, temporaries,
paging buffers, allocator slack and the runtime.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..engine.config import OFFLOADS, PRECISIONS, HiFTConfig
from ..engine.optimizer import HiFTOptimizer
from ..engine.optimizers import METHODS, OPTIMIZERS, resolve_optimizer
from ..engine.state.precision import DTYPES
from ..engine.state.store import StateStore, Tensors, tensor_bytes
from ..errors import UserError
from .configs import TASK_HEADS, build_model, resolve_config
from .measure import MiB, PeakMemory, current_memory_mib, peak_memory_mib
from .render import write_json

logger = logging.getLogger(__name__)

#: The tasks ``profile`` can train: its batches are token ids (a causal LM, a classifier).
PROFILE_TASKS = tuple(t for t, head in TASK_HEADS.items() if head in ("causal-lm", "seq-cls"))

#: The engine's offloads plus ``discard``, which is not a real offload: it throws inactive state
#: away (:class:`DiscardStore`), the memory floor of paging.
PROFILE_OFFLOADS = (*OFFLOADS, "discard")
#: ``separate``: time extra steps under glibc's usual malloc settings; ``shared``: time the
#: memory steps themselves.
TIMINGS = ("separate", "shared")
#: The learning rate of every run. It does not matter for memory or time; it only has to keep
#: random-weight training finite.
LR = 1e-5
#: Optimizers that a store discarding state breaks, and why: their step finds a partial state.
CANNOT_DISCARD = {
    "adagrad": "it creates its state up front, not at its first step",
    # HiFT pages only the tensors of a state; the optimizer's Python numbers stay in memory.
    "adafactor": "it keeps its step count as a Python number, which outlives the discarded tensors",
}
#: Environment of the worker process (see the module docstring for why).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
#: Prefix of the progress lines the worker prints and the parent reads.
PROGRESS = "hiftune-profile-step"

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


@dataclass(frozen=True)
class RunSpec:
    """One configuration to profile.

    Attributes:
        model: A preset name or a Hugging Face ``config.json`` file or directory.
        method: ``"fpft"`` (the plain optimizer over all parameters) or ``"hift"``.
        task: One of :data:`PROFILE_TASKS` (a head or a recipe task).
        batch_size: Sequences per step.
        seq_len: Tokens per sequence.
        optimizer: A name of :data:`hiftune.engine.optimizers.OPTIMIZERS`.
        units_per_group: HiFT's m.
        max_unit_params: HiFT's unit size budget (:attr:`HiFTConfig.max_unit_params`).
        group_by: How HiFT packs units into groups (:attr:`HiFTConfig.group_by`).
        offload: HiFT's offload, or ``"discard"`` (inactive state thrown away: the floor).
        precision: HiFT's precision (FPFT always runs in fp32).
        steps: Timed steps.
        warmup: Untimed steps before them (their memory still counts towards the peak).
        seed: Seed of the weights and of the random tokens.
        device: ``"cpu"`` or ``"cuda"``.
        offload_dir: Directory for ``offload="disk"`` (``None``: a temporary directory).
        timing: ``"separate"``: after the memory steps, run ``steps`` more steps for the clock
            with glibc's usual malloc thresholds (see :func:`measure_run`); ``"shared"``: time the
            memory steps themselves (faster; step times then include the page faults of returning
            every freed tensor to the kernel).
        threads: ``torch.set_num_threads`` for the worker (``None``: torch's default).

    Raises:
        UserError: For an unknown name, a count out of range, or a combination that cannot run.
    """

    model: str
    method: str
    task: str = "causal-lm"
    batch_size: int = 1
    seq_len: int = 128
    optimizer: str = "adamw"
    units_per_group: int = 1
    max_unit_params: int | str | None = "auto"
    group_by: str = "count"
    offload: str = "disk"
    precision: str = "fp32"
    steps: int = 1
    warmup: int = 1
    seed: int = 0
    device: str = "cpu"
    offload_dir: str | None = None
    timing: str = "separate"
    threads: int | None = None

    def __post_init__(self) -> None:
        for name, allowed in (
            ("method", METHODS),
            ("task", PROFILE_TASKS),
            ("optimizer", tuple(OPTIMIZERS)),
            ("offload", PROFILE_OFFLOADS),
            ("precision", PRECISIONS),
            ("timing", TIMINGS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        for name in ("batch_size", "seq_len", "units_per_group", "steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        try:  # the split options mean what they mean to the engine, checked by it
            self.split_config()
        except ValueError as e:
            raise UserError(str(e)) from None
        if self.warmup < 0:
            raise UserError(f"warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"threads must be >= 1, got {self.threads}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("device cuda asked for, but torch sees no CUDA device")
        if self.method == "hift" and self.offload == "discard":
            problem = discard_problem(self.precision, self.optimizer)
            if problem:
                raise UserError(problem)

    def split_config(self) -> HiFTConfig:
        """The engine's config of this run's unit split (m, unit budget, grouping)."""
        return HiFTConfig(
            units_per_group=self.units_per_group,
            max_unit_params=self.max_unit_params,  # type: ignore[arg-type]
            group_by=self.group_by,  # type: ignore[arg-type]
        )

    @property
    def label(self) -> str:
        """A short name for tables and plots, e.g. ``"FPFT fp32"`` or ``"HiFT disk fp32"``."""
        if self.method == "fpft":
            return "FPFT fp32"
        return f"HiFT {self.offload} {self.precision}"


def discard_problem(precision: str, optimizer: str) -> str | None:
    """Why ``offload="discard"`` cannot run with ``precision`` and ``optimizer`` (``None``: it can)."""
    if precision != "fp32":
        return (
            "offload discard is the floor of fp32 paging only: it would throw the fp32 "
            "master weights of mixed precision away too"
        )
    if optimizer in CANNOT_DISCARD:
        return (
            f"offload discard cannot run {optimizer}: {CANNOT_DISCARD[optimizer]}, so "
            "discarding its state breaks its step"
        )
    return None


class DiscardStore(StateStore):
    """A store that throws inactive state away: the memory floor of any paging scheme.

    Training with it is wrong (every group restarts its optimizer at each of its steps); it exists
    only so that the profiler can show how close real paging comes to holding nothing at all.
    """

    def __init__(self) -> None:
        self._keys: set[int] = set()

    def put(self, key: int, tensors: Tensors) -> None:
        self._keys.add(key)  # the tensors are dropped with the caller's last reference

    def get(self, key: int) -> Tensors:
        self._keys.discard(key)
        return {}

    def peek(self, key: int) -> Tensors:
        return {}

    def __contains__(self, key: int) -> bool:
        return key in self._keys

    def resident_bytes(self) -> int:
        return 0


def model_config(model: str, task: str) -> Any:
    """The ``transformers`` config of ``model``, ready for ``task`` (see :func:`resolve_config`)."""
    config = resolve_config(model)
    if task == "seq-cls" and getattr(config, "pad_token_id", None) is None:
        # Sequence classification pools the last non-padding token and needs a padding id.
        config.pad_token_id = 0
    return config


def measure_run(spec: RunSpec, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Trains ``spec`` on random tokens in this process and measures memory and step time.

    Call it in a fresh process (as :func:`hiftune.memory.profile.run_in_subprocess` does): on CPU
    the peak resident set size includes everything the process did before.

    The steps run in up to three phases: ``warmup`` (untimed; memory counts), ``memory`` (per-step
    peaks for the plot) and, with ``spec.timing == "separate"``, ``timing``. The memory phases run
    with the worker's ``MALLOC_*`` settings, under which every freed tensor goes back to the
    kernel and comes back as fresh zeroed pages: honest resident sizes, but up to a second of
    page faults per step for FPFT on a 135M model, which a real training process does not pay.
    Before the timing phase the thresholds are put back near glibc's defaults (``mallopt``), so
    step times are those of an ordinary process.

    Args:
        spec: The configuration.
        on_step: Called with the number of finished steps after each step.

    Returns:
        A JSON-ready dict: ``memory_mib`` (peak and breakdown, over the warm-up and memory
        phases), ``time_s`` (step-time statistics over the timed phase) and ``steps`` (one record
        per step of every phase).
    """
    device = torch.device(spec.device)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    runtime_mib = current_memory_mib(device)
    torch.manual_seed(spec.seed)
    hift = spec.method == "hift"
    mixed = hift and spec.precision != "fp32"
    config = model_config(spec.model, spec.task)
    model = build_model(
        config, spec.task, device=device, dtype=DTYPES[spec.precision] if mixed else torch.float32
    )
    model.train()
    params = list(model.parameters())  # tied weights appear once
    num_params = sum(p.numel() for p in params)
    opt_cls, opt_kwargs = resolve_optimizer(spec.optimizer, lr=LR)

    opt: torch.optim.Optimizer
    if hift:
        store_offload = "none" if spec.offload == "discard" else spec.offload
        hcfg = dataclasses.replace(
            spec.split_config(),
            offload=store_offload,  # type: ignore[arg-type]
            offload_dir=spec.offload_dir if store_offload == "disk" else None,
            precision=spec.precision,  # type: ignore[arg-type]
        )
        store = DiscardStore() if spec.offload == "discard" else None
        opt = HiFTOptimizer(model, opt_cls, hcfg, store=store, **opt_kwargs)
        num_groups = opt.num_groups
    else:
        opt = opt_cls(params, **opt_kwargs)
        num_groups = 1
    # Optimizer state that stays in this device's memory while its group is inactive.
    keeps_inactive = hift and (
        spec.offload == "none" or (spec.offload == "host" and device.type == "cpu")
    )
    meter = _StateMeter(params, keeps_inactive, num_params if mixed else 0)
    handle = register_optimizer_step_post_hook(meter)

    batches = _BatchMaker(config, spec, device)
    setup_peak_mib = peak_memory_mib(device)  # read before the meter resets the high-water mark
    peak_memory = PeakMemory(device)
    phases = ["warmup"] * spec.warmup + ["memory"] * spec.steps
    if spec.timing == "separate":
        phases += ["timing"] * spec.steps
    records: list[dict[str, Any]] = []
    try:
        for i, phase in enumerate(phases):
            if phase == "timing" and (i == 0 or phases[i - 1] != "timing"):
                _malloc_for_speed()
            batch = batches()
            group = opt.group_names[opt.active_group] if isinstance(opt, HiFTOptimizer) else "all"
            meter.new_step()
            peak_memory.reset()
            t0, c0 = time.perf_counter(), time.process_time()
            loss = model(**batch).loss
            scaled = opt.scale_loss(loss) if isinstance(opt, HiFTOptimizer) else loss
            scaled.backward()
            grad_bytes = tensor_bytes([p.grad for p in params])  # None counts 0
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
            records.append(
                {
                    "step": i,
                    "phase": phase,
                    "group": group,
                    "time_s": seconds,
                    "cpu_s": cpu_seconds,
                    "peak_mib": peak_memory.peak(),
                    "reserved_mib": peak_memory.peak_reserved(),
                    "pinned_mib": _pinned_mib(peak_memory, opt),
                    "loss": float(loss.detach()),
                    "gradients_mib": max(grad_bytes, meter.step_grad_bytes) / MiB,
                    "optimizer_states_mib": meter.step_state_bytes / MiB,
                    "masters_mib": meter.step_master_bytes / MiB,
                }
            )
            if on_step is not None:
                on_step(i + 1)
    finally:
        handle.remove()
        peak_memory.close()
        if isinstance(opt, HiFTOptimizer):
            opt.close()

    # Memory from the warm-up and memory phases (in the timing phase glibc keeps freed memory).
    measured = [r for r in records if r["phase"] != "timing"]
    timed = [
        r for r in records if r["phase"] == ("timing" if spec.timing == "separate" else "memory")
    ]
    peak = max(r["peak_mib"] for r in measured)
    weights = tensor_bytes(params) / MiB + max(r["masters_mib"] for r in measured)
    grads = max(r["gradients_mib"] for r in measured)
    states = max(r["optimizer_states_mib"] for r in measured)
    return {
        "label": spec.label,
        "spec": dataclasses.asdict(spec),
        "optimizer_class": f"{opt_cls.__module__}.{opt_cls.__qualname__}",
        "num_params": num_params,
        "num_groups": num_groups,
        "skipped_steps": opt.skipped_steps if isinstance(opt, HiFTOptimizer) else 0,
        "memory_mib": {
            "peak": peak,
            "weights": weights,
            "gradients": grads,
            "optimizer_states": states,
            "rest": peak - weights - grads - states,
            "runtime": runtime_mib,
            "setup_peak": setup_peak_mib,
            "reserved_peak": _max_or_none(r["reserved_mib"] for r in measured),
            "pinned_peak": _max_or_none(r["pinned_mib"] for r in measured),
        },
        "time_s": {
            "mean_step": statistics.fmean(r["time_s"] for r in timed),
            "median_step": statistics.median(r["time_s"] for r in timed),
            "min_step": min(r["time_s"] for r in timed),
            "max_step": max(r["time_s"] for r in timed),
            "mean_step_cpu": statistics.fmean(r["cpu_s"] for r in timed),
            "timed_steps": len(timed),
            "warmup_steps": spec.warmup,
            "timing": spec.timing,
        },
        "steps": records,
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "peak_method": peak_memory.method,
            "malloc": {k: os.environ.get(k) for k in MALLOC_ENV},
        },
    }


def _pinned_mib(meter: PeakMemory, opt: torch.optim.Optimizer) -> float | None:
    """The step's peak pinned host memory: the caching host allocator's, plus the buffers a host
    store pins itself (persistent: their size is their peak); ``None`` off CUDA."""
    pinned = meter.peak_pinned()
    store = opt.store if isinstance(opt, HiFTOptimizer) else None
    own = getattr(store, "pinned_bytes", None)
    if pinned is None or own is None:
        return pinned
    return pinned + own() / MiB


def _max_or_none(values: Iterable[float | None]) -> float | None:
    """The largest value, ``None`` if there is none (a figure not read on this device)."""
    return max((v for v in values if v is not None), default=None)


class _StateMeter:
    """A global optimizer step hook that counts the optimizer state resident at each step.

    It fires after every ``Optimizer.step`` in the process: the FPFT optimizer's, or each HiFT
    group's own optimizer (whose state is on the device exactly then). HiFTOptimizer's own step
    is skipped: its state is a view of the groups'.
    """

    def __init__(
        self, model_params: list[torch.nn.Parameter], keeps_inactive: bool, all_masters: int
    ) -> None:
        # fp32 masters (mixed precision) are what the optimizer steps that is not the model's own
        # memory; a row shard is a view of its weight's storage, so it is not a master. Read once:
        # the meter is built after the optimizer has cast the model, and it runs in timed steps.
        self._model_storage = {p.untyped_storage().data_ptr() for p in model_params}
        self._keeps_inactive = keeps_inactive
        self._all_master_bytes = all_masters * 4  # fp32 masters of every group
        self._state_of: dict[int, int] = {}  # id(optimizer) -> bytes of its state when last seen
        self.new_step()

    def new_step(self) -> None:
        self.step_state_bytes = 0
        self.step_master_bytes = 0
        self.step_grad_bytes = 0

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if isinstance(optimizer, HiFTOptimizer):
            return
        state = tensor_bytes(list(optimizer.state.values()))  # non-tensor values count 0
        self._state_of[id(optimizer)] = state
        stepped = [p for g in optimizer.param_groups for p in g["params"]]
        masters = [p for p in stepped if p.untyped_storage().data_ptr() not in self._model_storage]
        self.step_grad_bytes = tensor_bytes([p.grad for p in masters])
        if self._keeps_inactive:
            self.step_state_bytes = sum(self._state_of.values())
            self.step_master_bytes = self._all_master_bytes
        else:
            self.step_state_bytes = state
            self.step_master_bytes = tensor_bytes(masters)


class _BatchMaker:
    """Random token batches (a fresh one per step, from a seeded generator)."""

    def __init__(self, config: Any, spec: RunSpec, device: torch.device) -> None:
        self._gen = torch.Generator().manual_seed(spec.seed + 1)
        self._shape = (spec.batch_size, spec.seq_len)
        self._vocab = int(config.vocab_size)
        self._task = spec.task
        self._labels = int(getattr(config, "num_labels", 2))
        self._device = device

    def __call__(self) -> dict[str, torch.Tensor]:
        # Token 0 is kept out: it is the padding token of seq-cls models without one.
        ids = torch.randint(1, self._vocab, self._shape, generator=self._gen)
        if self._task == "causal-lm":
            labels = ids
        else:
            labels = torch.randint(0, self._labels, self._shape[:1], generator=self._gen)
        return {"input_ids": ids.to(self._device), "labels": labels.to(self._device)}


def _malloc_for_speed() -> None:
    """Puts glibc's malloc thresholds back near their defaults (a no-op without glibc).

    With ``MALLOC_MMAP_THRESHOLD_`` set, glibc stops raising its mmap threshold dynamically; by
    default it rises to at most 32 MiB, and the trim threshold to twice that, which lets an
    ordinary process reuse freed memory instead of faulting fresh pages in at every step.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * MiB)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 * MiB)
    except (OSError, AttributeError):
        logger.debug("no glibc mallopt: timing with the current malloc settings")


def main(argv: Sequence[str]) -> int:
    """The worker process: ``SPEC_JSON RESULT_PATH`` -> measure, write the result, exit 0.

    Progress goes to stdout as ``hiftune-profile-step N`` lines (the parent's progress bar); errors
    go to stderr, whose last lines the parent shows if the worker fails.
    """
    if len(argv) != 2:
        sys.stderr.write("usage: python -m hiftune.memory.profile_worker SPEC_JSON RESULT_PATH\n")
        return 2
    spec_json, result_path = argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spec = RunSpec(**json.loads(spec_json))

    def report(n: int) -> None:
        sys.stdout.write(f"{PROGRESS} {n}\n")
        sys.stdout.flush()

    result = measure_run(spec, report)
    if not all(math.isfinite(s["loss"]) for s in result["steps"]):
        logger.warning("%s: non-finite loss in some steps", spec.label)
    write_json(result_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
