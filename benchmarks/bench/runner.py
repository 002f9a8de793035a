"""Runs configurations back to back, each in a fresh ``bench.worker`` process, and collects them.

A fresh process per configuration is what makes the peak resident set comparable: nothing a
previous method allocated (or its allocator kept) is counted. Full fine-tuning runs first at
every batch size, so each ratio compares with a baseline measured in the same run, minutes apart.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from . import methods

logger = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parents[1]
#: Packages whose versions the report lists (the methods' own ones come from ``methods``).
BASE_PACKAGES = ("torch", "transformers", "hiftune")


def versions() -> dict[str, str]:
    """Installed version of Python, the base packages and every method's package."""
    out = {"python": platform.python_version()}
    for name in (*BASE_PACKAGES, *sorted({m.package for m in methods.METHODS})):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine_load() -> dict[str, Any]:
    """The time and load average (the step times depend on what else runs)."""
    return {
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def worker_command(method: str, batch_size: int, out: Path, **kw: Any) -> list[str]:
    """The command line that measures ``method`` at ``batch_size`` into ``out``."""
    cmd = [sys.executable, "-m", "bench.worker", "--method", method]
    cmd += ["--batch-size", str(batch_size), "--out", str(out)]
    for key, value in kw.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd


def run_one(
    method: str, batch_size: int, log_dir: Path, timeout: float = 1800, **kw: Any
) -> dict[str, Any]:
    """Measures one configuration in a fresh process; a failure becomes ``{"error": reason}``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out = log_dir / f"{method}-b{batch_size}.json"
    log = log_dir / f"{method}-b{batch_size}.log"
    out.unlink(missing_ok=True)
    cmd = worker_command(method, batch_size, out, **kw)
    env = worker_env()
    start = time.perf_counter()
    load = machine_load()
    try:
        with open(log, "w") as f:
            code = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False
            ).returncode
    except subprocess.TimeoutExpired:
        code = None
    result: dict[str, Any]
    if out.is_file():
        result = json.loads(out.read_text())
    else:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        reason = "timed out" if code is None else f"exit code {code}"
        result = {"method": method, "batch_size": batch_size, "error": f"{reason}: {tail}"}
    result["wall_s"] = time.perf_counter() - start
    result["load_before"] = load
    # Relative to the repository root, where the page says to run it from.
    command = shlex.join(["python", "-m", "bench.worker", *cmd[3:-2]])
    result["command"] = command.replace(f"{ROOT}/", "")
    return result


def worker_env() -> dict[str, str]:
    """The environment of a worker process: ``bench`` importable in front of the caller's
    ``PYTHONPATH`` (which may point at the ``hiftune`` to measure), one thread per worker."""
    path = [str(BENCH_DIR.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    # One thread also for the OpenMP/MKL pools torch does not own.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_matrix(plan: list[tuple[str, int]], log_dir: Path, **kw: Any) -> dict[str, Any]:
    """Runs every ``(method, batch_size)`` of ``plan`` in order, one fresh process each."""
    started = machine_load()
    results = []
    for method, batch_size in plan:
        logger.info("%s at batch %d (load %s)", method, batch_size, machine_load()["loadavg"])
        r = run_one(method, batch_size, log_dir, **kw)
        if "error" in r:
            logger.warning("  %s: %s", method, r["error"])
        else:
            logger.info(
                "  peak %.0f MiB, %.2f s/step, %.0f s in all", r["peak_mib"], r["mean_step_s"],
                r["wall_s"],
            )  # fmt: skip
        results.append(r)
    return {
        "started": started,
        "finished": machine_load(),
        "versions": versions(),
        "settings": kw,
        "results": results,
    }


def plan_for(batch_sizes: list[int], names: dict[int, list[str]]) -> list[tuple[str, int]]:
    """The run order: per batch size, full fine-tuning fp32 first, then the others as listed."""
    plan = []
    for b in batch_sizes:
        chosen = names[b]
        first = [n for n in chosen if n == "fpft-fp32"]
        plan += [(n, b) for n in first + [n for n in chosen if n != "fpft-fp32"]]
    return plan
