"""``hiftune profile``: measure the peak memory and step time of FPFT vs HiFT for real.

Every configuration (plain full fine-tuning, or HiFT with one offload and precision) is a
:class:`~hiftune.memory.profile_worker.RunSpec`; :func:`build_specs` makes the configurations of one
comparison, and :func:`profile` trains each in a **fresh Python subprocess**
(:mod:`hiftune.memory.profile_worker`, which says why and how it measures), one after the other,
then compares them (:func:`compare`). :mod:`hiftune.memory.profile_report` renders the result.

Example:
    >>> specs = build_specs("smollm2-135m", offloads=["disk"], seq_len=128)  # doctest: +SKIP
    >>> result = profile(specs)  # doctest: +SKIP
    >>> result["ratios"][0]["peak_vs_fpft"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..engine.config import PRECISIONS, HiFTConfig
from ..engine.optimizers import METHODS
from ..engine.split.units import group_units, split_units
from ..errors import UserError
from . import profile_worker
from .configs import build_model
from .profile_worker import (
    MALLOC_ENV,
    PROFILE_OFFLOADS,
    PROFILE_TASKS,
    PROGRESS,
    TIMINGS,
    RunSpec,
    discard_problem,
    model_config,
)

__all__ = [
    "PROFILE_OFFLOADS",
    "PROFILE_TASKS",
    "TIMINGS",
    "RunSpec",
    "build_specs",
    "compare",
    "count_groups",
    "default_device",
    "default_offloads",
    "profile",
    "run_in_subprocess",
]

logger = logging.getLogger(__name__)


def default_device() -> str:
    """``"cuda"`` if torch sees a CUDA device, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_offloads(device: str) -> list[str]:
    """The offload worth measuring on ``device``: ``host`` on CUDA, ``disk`` on CPU (where host
    memory is the device, so ``host`` keeps everything resident exactly like ``none``)."""
    return ["host"] if device == "cuda" else ["disk"]


def run_in_subprocess(
    spec: RunSpec, on_step: Callable[[int], None] | None = None, timeout: float | None = None
) -> dict[str, Any]:
    """Runs :func:`~hiftune.memory.profile_worker.measure_run` for ``spec`` in a fresh Python
    process and returns its result.

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
        spec_json = json.dumps(dataclasses.asdict(spec))
        cmd = [sys.executable, "-m", profile_worker.__name__, spec_json, str(result_path)]
        logger.debug("worker: %s", " ".join(cmd))
        with open(stderr_path, "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            timer = threading.Timer(timeout, proc.kill) if timeout else None
            if timer:
                timer.start()
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    if line.startswith(PROGRESS) and on_step is not None:
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
        result: dict[str, Any] = json.loads(result_path.read_text())
        return result


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
        methods: Which of ``"fpft"``, ``"hift"`` to run (FPFT runs first either way).
        offloads: HiFT offloads, of :data:`PROFILE_OFFLOADS` (``"discard"`` = the floor).
        precisions: HiFT precisions, of :data:`hiftune.engine.config.PRECISIONS`.
        steps: Timed HiFT steps; ``None`` = one HiFT cycle (k steps).
        fpft_steps: Timed FPFT steps; ``None`` = as many as HiFT.
        warmup: Untimed steps first; ``None`` = one full HiFT cycle for HiFT (the first cycle
            creates every group's state, so paging reaches its steady state only in the second),
            one step for FPFT (whose first step creates the state).
        **common: Other :class:`RunSpec` fields (task, batch_size, seq_len, optimizer,
            units_per_group, max_unit_params, group_by, seed, device, offload_dir, timing,
            threads).

    Raises:
        UserError: For unknown names or a combination that cannot run; the message is meant
            for the user.
    """
    for name, values, allowed in (
        ("method", methods, METHODS),
        ("offload", offloads, PROFILE_OFFLOADS),
        ("precision", precisions, PRECISIONS),
    ):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise UserError(f"{name} must be one or more of {', '.join(allowed)}; got {bad}")
    # The fields every run shares are checked before the model is built.
    first = RunSpec(model, "fpft", **common)
    if "hift" in methods and "discard" in offloads:
        # The floor is measured for the fp32 runs only (and skipped for the others below).
        problem = discard_problem(
            "fp32" if "fp32" in precisions else precisions[0], first.optimizer
        )
        if problem:
            raise UserError(problem)

    k = count_groups(model, first.task, first.seq_len, first.split_config())
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
    model: str, task: str = "causal-lm", seq_len: int = 0, hift: HiFTConfig | None = None
) -> int:
    """k, the number of HiFT groups of ``model`` (built on the meta device: no memory used).

    Args:
        model: A preset name or a Hugging Face ``config.json`` file or directory.
        task: A key of :data:`~hiftune.memory.configs.TASK_HEADS`.
        seq_len: Tokens per sequence (checked against the model's positions).
        hift: The unit split: m, the unit budget and the grouping (default ``HiFTConfig()``).

    Raises:
        UserError: If the model cannot be read or built, ``units_per_group`` exceeds its units,
            or ``seq_len`` exceeds its positions.
    """
    try:
        config = model_config(model, task)
        max_pos = getattr(config, "max_position_embeddings", None)
        if max_pos is not None and seq_len > max_pos:
            raise UserError(
                f"seq_len {seq_len} exceeds the model's max_position_embeddings {max_pos}"
            )
        meta = build_model(config, task, device="meta")
        hift = hift or HiFTConfig()
        return len(group_units(split_units(meta, hift), hift.units_per_group))
    except UserError:
        raise
    except ValueError as e:  # the model tools' and the engine's messages are meant for the user
        raise UserError(str(e)) from None


def profile(
    specs: Sequence[RunSpec],
    on_step: Callable[[RunSpec, int], None] | None = None,
) -> dict[str, Any]:
    """Profiles each configuration in its own subprocess, one after the other, and compares them.

    Args:
        specs: The configurations (from :func:`build_specs`), run back to back in this order.
        on_step: Called with the spec and its number of finished steps as workers report them.

    Returns:
        A JSON-ready dict with ``runs`` (one ``measure_run`` result each), ``ratios`` (every
        HiFT run against FPFT, against ``offload="none"`` for time and against ``"discard"`` for
        memory, where those runs exist) and ``host`` (CPU count and load before and after).

    Raises:
        RuntimeError: If a worker fails.
    """
    load_before = _load()
    runs = []
    for spec in specs:
        logger.info("profiling %s", spec.label)
        callback = None
        if on_step is not None:
            callback = _bind(on_step, spec)
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


def _bind(on_step: Callable[[RunSpec, int], None], spec: RunSpec) -> Callable[[int], None]:
    return lambda n: on_step(spec, n)


def _ratio(a: dict[str, Any], b: dict[str, Any] | None, section: str, key: str) -> float | None:
    if b is None or not b[section][key]:
        return None
    ratio: float = a[section][key] / b[section][key]
    return ratio


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
