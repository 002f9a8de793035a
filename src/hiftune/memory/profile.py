"""``hiftune profile``: measure the peak memory and step time of FPFT vs HiFT for real.

Every configuration (plain full fine-tuning, or HiFT with one offload and precision) trains a
randomly initialised model on random tokens in a **fresh Python subprocess**:

* the peak resident set size of a CPU process cannot be lowered once reached, so runs sharing a
  process would inherit each other's peaks (and allocator caches);
* the worker is started with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` and
  ``MALLOC_TRIM_THRESHOLD_=65536`` (unless already set): every block above 64 KiB (all real tensors)
  is then ``mmap``-ed and given back to the kernel when freed. Without this glibc keeps freed
  memory in its heap, and the resident set size measures the allocator's history rather than what
  the training step holds.

Memory is the process's resident set size on CPU (so it includes the Python runtime and the
libraries, reported as ``runtime``) and ``torch.cuda.max_memory_allocated`` on CUDA. The peak of
each step is read exactly: on Linux, writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's
high-water mark (``VmHWM``), which is read back after the step; elsewhere a thread samples the
resident set size every millisecond.

The breakdown follows the paper's memory model (method notes, section 7): ``weights`` = bytes of the
model's parameters (plus the fp32 masters resident at once, in mixed precision), ``gradients`` =
the largest bytes of ``.grad`` tensors seen in a step, ``optimizer_states`` = the largest bytes of
optimizer state resident at a step (for HiFT: the active group's, plus every other group's when the
offload keeps them in memory), and ``rest`` = peak minus those three: activations, temporaries,
paging buffers, allocator slack and the runtime.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..engine.config import HiFTConfig
from ..engine.optimizer import HiFTOptimizer
from ..engine.paging import StateStore, Tensors
from ..engine.precision import DTYPES
from .report import markdown_table, plot_lines, write_json
from ..engine.units import group_units, split_units
from .measure import MiB, current_memory_mib, peak_memory_mib, reset_peak_memory
from .configs import HEADS, build_model, resolve_config

logger = logging.getLogger(__name__)

METHODS = ("fpft", "hift")
#: ``discard`` is not a real offload: it throws inactive state away, the memory floor of paging.
OFFLOADS = ("none", "host", "disk", "discard")
#: Optimizer name -> (class, keyword arguments). The learning rate does not matter for memory
#: or time; it only has to keep random-weight training finite.
OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], dict[str, Any]]] = {
    "adamw": (torch.optim.AdamW, {"lr": 1e-5}),
    "sgd": (torch.optim.SGD, {"lr": 1e-5}),
    "sgdm": (torch.optim.SGD, {"lr": 1e-5, "momentum": 0.9}),
    "adagrad": (torch.optim.Adagrad, {"lr": 1e-5}),
    "adafactor": (torch.optim.Adafactor, {"lr": 1e-5}),
}
#: Optimizers that build their state in ``__init__`` (not lazily at the first step): a store that
#: discards state would leave them without it.
EAGER_STATE = ("adagrad",)
#: Environment of the worker process (see the module docstring for why).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}

_PROGRESS = "hiftune-profile-step"
_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


@dataclass(frozen=True)
class RunSpec:
    """One configuration to profile.

    Attributes:
        model: A preset name or a Hugging Face ``config.json`` file or directory.
        method: ``"fpft"`` (the plain optimizer over all parameters) or ``"hift"``.
        task: ``"causal-lm"`` or ``"seq-cls"``.
        batch_size: Sequences per step.
        seq_len: Tokens per sequence.
        optimizer: A key of :data:`OPTIMIZERS`.
        units_per_group: HiFT's m.
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
    """

    model: str
    method: str
    task: str = "causal-lm"
    batch_size: int = 1
    seq_len: int = 128
    optimizer: str = "adamw"
    units_per_group: int = 1
    offload: str = "disk"
    precision: str = "fp32"
    steps: int = 1
    warmup: int = 1
    seed: int = 0
    device: str = "cpu"
    offload_dir: str | None = None
    timing: str = "separate"
    threads: int | None = None

    @property
    def label(self) -> str:
        """A short name for tables and plots, e.g. ``"FPFT"`` or ``"HiFT disk fp32"``."""
        if self.method == "fpft":
            return "FPFT fp32"
        return f"HiFT {self.offload} {self.precision}"


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


# --- the worker: one configuration, in this process ---------------------------------------------


def measure_run(spec: RunSpec, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Trains ``spec`` on random tokens in this process and measures memory and step time.

    Call it in a fresh process (as :func:`run_in_subprocess` does): on CPU the peak resident set
    size includes everything the process did before.

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
    config = _model_config(spec.model, spec.task)
    model = build_model(
        config, spec.task, device=device, dtype=DTYPES[spec.precision] if mixed else torch.float32
    )
    model.train()
    params = list(model.parameters())  # tied weights appear once
    model_ids = {id(p) for p in params}
    num_params = sum(p.numel() for p in params)
    opt_cls, opt_kwargs = OPTIMIZERS[spec.optimizer]

    opt: torch.optim.Optimizer
    if hift:
        store_offload = "none" if spec.offload == "discard" else spec.offload
        hcfg = HiFTConfig(
            units_per_group=spec.units_per_group,
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
    meter = _StateMeter(model_ids, keeps_inactive, num_params if mixed else 0)
    handle = register_optimizer_step_post_hook(meter)

    batches = _BatchMaker(config, spec, device)
    setup_peak_mib = peak_memory_mib(device)  # read before the tracker resets the high-water mark
    tracker = _PeakTracker(device)
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
            tracker.reset()
            t0, c0 = time.perf_counter(), time.process_time()
            loss = model(**batch).loss
            scaled = opt.scale_loss(loss) if isinstance(opt, HiFTOptimizer) else loss
            scaled.backward()
            grad_bytes = _grad_bytes(params)
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
                    "peak_mib": tracker.peak(),
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
        tracker.close()
        if isinstance(opt, HiFTOptimizer):
            opt.close()

    # Memory from the warm-up and memory phases (in the timing phase glibc keeps freed memory).
    measured = [r for r in records if r["phase"] != "timing"]
    timed = [
        r for r in records if r["phase"] == ("timing" if spec.timing == "separate" else "memory")
    ]
    peak = max(r["peak_mib"] for r in measured)
    weights = _bytes(params) / MiB + max(r["masters_mib"] for r in measured)
    grads = max(r["gradients_mib"] for r in measured)
    states = max(r["optimizer_states_mib"] for r in measured)
    return {
        "label": spec.label,
        "spec": dataclasses.asdict(spec),
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
            "peak_method": tracker.method,
            "malloc": {k: os.environ.get(k) for k in MALLOC_ENV},
        },
    }


class _StateMeter:
    """A global optimizer step hook that counts the optimizer state resident at each step.

    It fires after every ``Optimizer.step`` in the process: the FPFT optimizer's, or each HiFT
    group's own optimizer (whose state is on the device exactly then). HiFTOptimizer's own step
    is skipped: its state is a view of the groups'.
    """

    def __init__(self, model_ids: set[int], keeps_inactive: bool, all_masters: int) -> None:
        self._model_ids = model_ids
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
        state = sum(
            _bytes(v for v in s.values() if torch.is_tensor(v)) for s in optimizer.state.values()
        )
        self._state_of[id(optimizer)] = state
        stepped = [p for g in optimizer.param_groups for p in g["params"]]
        masters = [p for p in stepped if id(p) not in self._model_ids]  # mixed precision
        self.step_grad_bytes = _bytes(p.grad for p in masters if p.grad is not None)
        if self._keeps_inactive:
            self.step_state_bytes = sum(self._state_of.values())
            self.step_master_bytes = self._all_master_bytes
        else:
            self.step_state_bytes = state
            self.step_master_bytes = _bytes(masters)


class _PeakTracker:
    """The peak memory of one step: exact on CUDA and Linux, sampled elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._sampled = 0.0
        self._stop: threading.Event | None = None
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
        elif _clear_refs_works():
            self.method = "VmHWM after /proc/self/clear_refs"
        else:
            self.method = "resident set size sampled every 1 ms"
            self._stop = threading.Event()
            threading.Thread(target=self._sample, daemon=True, name="hiftune-rss").start()

    def reset(self) -> None:
        if self._device.type == "cuda":
            reset_peak_memory(self._device)
        elif self._stop is None:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            self._sampled = current_memory_mib()

    def peak(self) -> float:
        if self._device.type == "cuda":
            return peak_memory_mib(self._device)
        if self._stop is None:
            return _vm_hwm_mib()
        return max(self._sampled, current_memory_mib())

    def close(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def _sample(self) -> None:
        assert self._stop is not None
        while not self._stop.wait(0.001):
            self._sampled = max(self._sampled, current_memory_mib())


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


def _clear_refs_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _vm_hwm_mib() > 0
    except OSError:
        return False


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return 0.0


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


def _model_config(model: str, task: str) -> Any:
    config = resolve_config(model)
    if task == "seq-cls" and getattr(config, "pad_token_id", None) is None:
        # Sequence classification pools the last non-padding token and needs a padding id.
        config.pad_token_id = 0
    return config


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _grad_bytes(params: Iterable[torch.Tensor]) -> int:
    return _bytes(p.grad for p in params if p.grad is not None)


# --- the parent: one subprocess per configuration -----------------------------------------------


def run_in_subprocess(
    spec: RunSpec, on_step: Callable[[int], None] | None = None, timeout: float | None = None
) -> dict[str, Any]:
    """Runs :func:`measure_run` for ``spec`` in a fresh Python process and returns its result.

    Args:
        spec: The configuration.
        on_step: Called with the number of finished steps as the worker reports them.
        timeout: Seconds before the worker is killed (``None``: no limit).

    Raises:
        RuntimeError: If the worker fails; the message ends with its last lines of stderr.
    """
    env = dict(os.environ)
    for key, value in MALLOC_ENV.items():
        env.setdefault(key, value)
    with tempfile.TemporaryDirectory(prefix="hiftune-profile-") as tmp:
        result_path = Path(tmp) / "result.json"
        stderr_path = Path(tmp) / "stderr.txt"
        cmd = [
            sys.executable,
            "-m",
            "hiftune.memory.profile",
            "--worker",
            json.dumps(dataclasses.asdict(spec)),
            "--result",
            str(result_path),
        ]
        logger.debug("worker: %s", " ".join(cmd))
        with open(stderr_path, "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            timer = threading.Timer(timeout, proc.kill) if timeout else None
            if timer:
                timer.start()
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    if line.startswith(_PROGRESS) and on_step is not None:
                        on_step(int(line.split()[1]))
                code = proc.wait()
            finally:
                if timer:
                    timer.cancel()
                if proc.poll() is None:
                    proc.kill()
        if code != 0 or not result_path.is_file():
            tail = "\n".join(stderr_path.read_text().strip().splitlines()[-15:])
            raise RuntimeError(f"profiling {spec.label} failed (exit code {code}):\n{tail}")
        return json.loads(result_path.read_text())


def build_specs(
    model: str,
    *,
    methods: Sequence[str] = METHODS,
    offloads: Sequence[str] = ("disk",),
    precisions: Sequence[str] = ("fp32",),
    steps: int | None = None,
    fpft_steps: int | None = None,
    warmup: int | None = None,
    **common: Any,
) -> list[RunSpec]:
    """The configurations of one comparison: FPFT (fp32) first, then HiFT per precision x offload.

    Args:
        model: A preset name or a Hugging Face ``config.json`` file or directory.
        methods: Which of ``"fpft"``, ``"hift"`` to run.
        offloads: HiFT offloads (``"discard"`` = the floor).
        precisions: HiFT precisions.
        steps: Timed HiFT steps; ``None`` = one HiFT cycle (k steps).
        fpft_steps: Timed FPFT steps; ``None`` = as many as HiFT.
        warmup: Untimed steps first; ``None`` = one full HiFT cycle for HiFT (the first cycle
            creates every group's state, so paging reaches its steady state only in the second),
            one step for FPFT (whose first step creates the state).
        **common: Other :class:`RunSpec` fields (task, batch_size, seq_len, optimizer,
            units_per_group, seed, device, offload_dir, timing, threads).

    Raises:
        ValueError: For unknown names or a combination that cannot run; the message is meant
            for the user.
    """
    for name, values, allowed in (
        ("method", methods, METHODS),
        ("offload", offloads, OFFLOADS),
        ("precision", precisions, tuple(DTYPES)),
    ):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise ValueError(f"{name} must be one or more of {', '.join(allowed)}; got {bad}")
    optimizer = common.get("optimizer", "adamw")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")
    task = common.get("task", "causal-lm")
    if task not in HEADS:
        raise ValueError(f"task must be one of {', '.join(HEADS)}; got {task!r}")
    for name in ("batch_size", "seq_len", "units_per_group"):
        if common.get(name, 1) < 1:
            raise ValueError(f"{name} must be >= 1, got {common[name]}")
    for name, value in (("steps", steps), ("fpft_steps", fpft_steps)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if warmup is not None and warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if common.get("timing", "separate") not in ("separate", "shared"):
        raise ValueError(f"timing must be separate or shared; got {common['timing']!r}")
    device = common.get("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but torch sees no CUDA device")
    if "hift" in methods and "discard" in offloads:
        if "fp32" not in precisions:
            raise ValueError(
                "offload discard is the floor of fp32 paging only: it would throw the fp32 "
                "master weights of mixed precision away too"
            )
        if optimizer in EAGER_STATE:
            raise ValueError(
                f"offload discard cannot run {optimizer}: it creates its state up front, and "
                "discarding it breaks its step"
            )

    k = count_groups(model, task, common.get("units_per_group", 1), common.get("seq_len", 128))
    hift_steps = steps or k
    specs = []
    if "fpft" in methods:
        specs.append(
            RunSpec(
                model,
                "fpft",
                steps=fpft_steps or hift_steps,
                warmup=1 if warmup is None else warmup,
                **common,
            )
        )
    if "hift" in methods:
        for precision in precisions:
            for offload in offloads:
                if offload == "discard" and precision != "fp32":
                    logger.info("no discard floor for %s: it would drop the masters", precision)
                    continue
                specs.append(
                    RunSpec(
                        model,
                        "hift",
                        offload=offload,
                        precision=precision,
                        steps=hift_steps,
                        warmup=k if warmup is None else warmup,
                        **common,
                    )
                )
    return specs


def count_groups(
    model: str, task: str = "causal-lm", units_per_group: int = 1, seq_len: int = 0
) -> int:
    """k, the number of HiFT groups of ``model`` (built on the meta device: no memory used).

    Raises:
        ValueError: If the model cannot be read or built, ``units_per_group`` exceeds its units,
            or ``seq_len`` exceeds its positions.
    """
    config = _model_config(model, task)
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {max_pos}")
    meta = build_model(config, task, device="meta")
    units = split_units(meta)
    return len(group_units(units, units_per_group))


def profile(
    specs: Sequence[RunSpec],
    on_step: Callable[[RunSpec, int], None] | None = None,
) -> dict[str, Any]:
    """Profiles each configuration in its own subprocess, one after the other, and compares them.

    Args:
        specs: The configurations (from :func:`build_specs`), run back to back in this order.
        on_step: Called with the spec and its number of finished steps as workers report them.

    Returns:
        A JSON-ready dict with ``runs`` (one :func:`measure_run` result each), ``ratios`` (every
        HiFT run against FPFT, against ``offload="none"`` for time and against ``"discard"`` for
        memory, where those runs exist) and ``host`` (CPU count and load before and after).
    """
    load_before = _load()
    runs = []
    for spec in specs:
        logger.info("profiling %s", spec.label)
        callback = (lambda n, s=spec: on_step(s, n)) if on_step else None
        runs.append(run_in_subprocess(spec, callback))
    return {
        "model": specs[0].model if specs else None,
        "runs": runs,
        "ratios": compare(runs),
        "host": {"cpus": os.cpu_count(), "load_before": load_before, "load_after": _load()},
    }


def compare(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ratios of each HiFT run to FPFT (peak, mean step wall and CPU time), to ``none`` (times),
    to ``discard`` (peak); a ratio is ``None`` when the run to compare against is missing."""
    fpft = next((r for r in runs if r["spec"]["method"] == "fpft"), None)

    def find(offload: str, precision: str) -> dict[str, Any] | None:
        return next(
            (
                r
                for r in runs
                if r["spec"]["method"] == "hift"
                and r["spec"]["offload"] == offload
                and r["spec"]["precision"] == precision
            ),
            None,
        )

    out = []
    for r in runs:
        if r["spec"]["method"] != "hift":
            continue
        none = find("none", r["spec"]["precision"])
        discard = find("discard", r["spec"]["precision"])
        out.append(
            {
                "label": r["label"],
                "peak_vs_fpft": _ratio(r, fpft, "memory_mib", "peak"),
                "time_vs_fpft": _ratio(r, fpft, "time_s", "mean_step"),
                "time_vs_none": _ratio(r, none, "time_s", "mean_step"),
                # CPU time (all threads of the worker, the paging thread included) is far less
                # sensitive than wall time to other jobs on a shared machine.
                "cpu_time_vs_fpft": _ratio(r, fpft, "time_s", "mean_step_cpu"),
                "cpu_time_vs_none": _ratio(r, none, "time_s", "mean_step_cpu"),
                "peak_vs_discard": _ratio(r, discard, "memory_mib", "peak"),
            }
        )
    return out


def _ratio(a: dict[str, Any], b: dict[str, Any] | None, section: str, key: str) -> float | None:
    if b is None or not b[section][key]:
        return None
    return a[section][key] / b[section][key]


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --- output --------------------------------------------------------------------------------------


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per run: peak, breakdown (MiB), mean step time (s) and the ratios."""
    ratios = {r["label"]: r for r in result["ratios"]}
    rows = []
    for run in result["runs"]:
        mem, t = run["memory_mib"], run["time_s"]
        ratio = ratios.get(run["label"], {})
        rows.append(
            {
                "config": run["label"],
                "peak MiB": mem["peak"],
                "weights": mem["weights"],
                "grads": mem["gradients"],
                "states": mem["optimizer_states"],
                "rest": mem["rest"],
                "(runtime)": mem["runtime"],
                "step s": t["mean_step"],
                "CPU s": t.get("mean_step_cpu", float("nan")),
                "timed steps": t["timed_steps"],
                "peak/FPFT": _fmt_ratio(ratio.get("peak_vs_fpft")),
                "time/FPFT": _fmt_ratio(ratio.get("time_vs_fpft")),
                "time/none": _fmt_ratio(ratio.get("time_vs_none")),
                "peak/discard": _fmt_ratio(ratio.get("peak_vs_discard")),
            }
        )
    return rows


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_markdown(result: dict[str, Any], command: str | None = None) -> str:
    """A Markdown report: the command, the workload, the table and the environment."""
    run0 = result["runs"][0]
    spec = run0["spec"]
    env = run0["environment"]
    host = result["host"]
    lines = [f"# hiftune profile: {result['model']}", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        f"Workload: {spec['task']}, batch {spec['batch_size']} x {spec['seq_len']} tokens, "
        f"{spec['optimizer']}, m = {spec['units_per_group']} "
        f"(k = {max(r['num_groups'] for r in result['runs'])} groups), random weights and tokens, "
        f"device {spec['device']}, {run0['num_params'] / 1e6:.2f}M parameters.",
        "",
        markdown_table(table_rows(result)),
        "Memory in MiB (peak resident set size on CPU), step time in seconds (mean over the timed "
        "steps; warm-up excluded; `CPU s`: CPU time of all the worker's threads). `rest` = peak - weights - grads - states: activations, "
        "temporaries, paging buffers and the runtime (Python + libraries, shown as `(runtime)`).",
        "",
        f"torch {env['torch']}, {env['threads']} threads, peak read by {env['peak_method']}, "
        f"malloc env {env['malloc']}, {host['cpus']} CPUs, load average before "
        f"{host['load_before']}, after {host['load_after']}.",
        "",
    ]
    return "\n".join(lines)


def plot_steps(path: str | Path, result: dict[str, Any]) -> Path:
    """Plots the peak memory of each timed step (one HiFT cycle by default) for every run."""
    series = {
        run["label"]: [s["peak_mib"] for s in run["steps"] if s["phase"] == "memory"]
        for run in result["runs"]
    }
    spec = result["runs"][0]["spec"]
    return plot_lines(
        path,
        series,
        title=f"{result['model']}: peak memory per step "
        f"(batch {spec['batch_size']} x {spec['seq_len']}, {spec['optimizer']})",
        xlabel="step of the measured cycle (HiFT: embedding first, bottom-up)",
        ylabel="peak memory (MiB)",
    )


def write_outputs(
    result: dict[str, Any],
    output_dir: str | Path,
    name: str = "profile",
    command: str | None = None,
) -> dict[str, Path]:
    """Writes ``<name>.md``, ``<name>.json`` and ``<name>.png`` under ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{name}.md"
    md.write_text(render_markdown(result, command))
    return {
        "markdown": md,
        "json": write_json(out / f"{name}.json", {"command": command, **result}),
        "png": plot_steps(out / f"{name}.png", result),
    }


# --- the command line ----------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``hiftune profile`` options to ``parser``."""
    parser.add_argument("model", help="a preset name or a Hugging Face config.json file or dir")
    parser.add_argument("--task", default="causal-lm", choices=HEADS)
    parser.add_argument("--batch-size", type=_positive_int, default=1)
    parser.add_argument("--seq-len", type=_positive_int, default=128)
    parser.add_argument("--optimizer", default="adamw", choices=tuple(OPTIMIZERS))
    parser.add_argument("--units-per-group", type=_positive_int, default=1, help="HiFT's m")
    parser.add_argument(
        "--offload",
        type=_csv,
        default=None,
        help="HiFT offload(s), comma-separated, of none, host, disk, discard (discard throws "
        "inactive state away: the floor of paging). Default: disk on CPU (where host memory is "
        "the device), host on CUDA.",
    )
    parser.add_argument(
        "--precision",
        type=_csv,
        default=["fp32"],
        help="HiFT precision(s), comma-separated, of fp32, bf16, fp16 (FPFT always runs fp32)",
    )
    parser.add_argument(
        "--methods", type=_csv, default=list(METHODS), help="which of fpft,hift to run"
    )
    parser.add_argument(
        "--steps", type=_positive_int, default=None, help="timed steps (default: one HiFT cycle)"
    )
    parser.add_argument(
        "--fpft-steps", type=_positive_int, default=None, help="timed FPFT steps (default: --steps)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps first (default: one HiFT cycle for HiFT, 1 for FPFT)",
    )
    parser.add_argument(
        "--timing",
        default="separate",
        choices=("separate", "shared"),
        help="separate (default): time extra steps under glibc's usual malloc settings; shared: "
        "time the memory steps (faster, but every freed tensor is returned to the kernel)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch threads per worker (default: torch's default, one per core)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--offload-dir", default=None, help="directory for disk paging")
    parser.add_argument(
        "--output-dir", default=None, help="write <name>.md, <name>.json and <name>.png here"
    )
    parser.add_argument("--name", default="profile", help="file name stem in --output-dir")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Runs ``hiftune profile``: every configuration in its own subprocess, then the report."""
    from tqdm.auto import tqdm

    from ..errors import UserError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    offloads = args.offload or (["host"] if device == "cuda" else ["disk"])
    try:
        specs = build_specs(
            args.model,
            methods=args.methods,
            offloads=offloads,
            precisions=args.precision,
            steps=args.steps,
            fpft_steps=args.fpft_steps,
            warmup=args.warmup,
            task=args.task,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            optimizer=args.optimizer,
            units_per_group=args.units_per_group,
            seed=args.seed,
            device=device,
            offload_dir=args.offload_dir,
            timing=args.timing,
            threads=args.threads,
        )
    except ValueError as e:
        raise UserError(str(e)) from None

    command = _command_line(args, offloads)
    total = sum(s.warmup + s.steps * (2 if s.timing == "separate" else 1) for s in specs)
    done: dict[RunSpec, int] = {}
    with tqdm(total=total, unit="step", disable=args.no_progress, file=sys.stderr) as bar:

        def on_step(spec: RunSpec, n: int) -> None:
            bar.set_description(spec.label)
            bar.update(n - done.get(spec, 0))
            done[spec] = n

        try:
            result = profile(specs, on_step)
        except RuntimeError as e:
            logger.error("%s", e)
            return 1

    paths = write_outputs(result, args.output_dir, args.name, command) if args.output_dir else {}
    if args.json:
        print(json.dumps({"command": command, **result}, indent=2, default=str))
    else:
        print(markdown_table(table_rows(result)), end="")
        for kind, path in paths.items():
            print(f"{kind}: {path}")
    return 0


def _command_line(args: argparse.Namespace, offloads: Sequence[str]) -> str:
    """The command that reproduces this run, every measured option spelled out."""
    parts = [
        "hiftune profile",
        args.model,
        f"--task {args.task}",
        f"--batch-size {args.batch_size}",
        f"--seq-len {args.seq_len}",
        f"--optimizer {args.optimizer}",
        f"--units-per-group {args.units_per_group}",
        f"--methods {','.join(args.methods)}",
        f"--offload {','.join(offloads)}",
        f"--precision {','.join(args.precision)}",
        f"--timing {args.timing}",
    ]
    for flag, value in (
        ("--steps", args.steps),
        ("--fpft-steps", args.fpft_steps),
        ("--warmup", args.warmup),
        ("--device", args.device),
        ("--threads", args.threads),
    ):
        if value is not None:
            parts.append(f"{flag} {value}")
    if args.seed:
        parts.append(f"--seed {args.seed}")
    return " ".join(parts)


def _worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m hiftune.memory.profile")
    parser.add_argument("--worker", required=True, help="RunSpec as JSON")
    parser.add_argument("--result", required=True, help="where to write the result JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spec = RunSpec(**json.loads(args.worker))

    def report(n: int) -> None:
        # The parent drives its progress bar from these lines.
        sys.stdout.write(f"{_PROGRESS} {n}\n")
        sys.stdout.flush()

    result = measure_run(spec, report)
    if not all(math.isfinite(s["loss"]) for s in result["steps"]):
        logger.warning("%s: non-finite loss in some steps", spec.label)
    write_json(args.result, result)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
