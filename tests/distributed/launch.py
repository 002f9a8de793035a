"""Launching a test script in several gloo processes on CPU, the way users launch training."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port nobody listens on right now, for the rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    script: str | Path,
    *args: str,
    nproc: int = 2,
    launcher: str = "torchrun",
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Runs ``script`` in ``nproc`` processes and waits for them, one torch thread each.

    Args:
        script: A Python file (relative to this directory, or absolute).
        *args: Its command-line arguments.
        nproc: The number of processes.
        launcher: ``"torchrun"`` (``python -m torch.distributed.run``), ``"accelerate"``
            (``accelerate launch --multi_gpu``, which on a machine without GPUs runs gloo on CPU)
            or ``"python"`` (one plain process, no process group).
        env: Extra environment variables.
        timeout: Seconds before the processes are killed.

    Raises:
        AssertionError: With the processes' output, if any of them failed.
    """
    path = Path(script) if Path(script).is_absolute() else Path(__file__).parent / script
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
        cmd += ["--master-addr=127.0.0.1", f"--master-port={port}"]
    elif launcher == "accelerate":
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", f"--num_processes={nproc}"]
        cmd += ["--num_cpu_threads_per_process=1", f"--main_process_port={port}"]
    elif launcher == "python":
        cmd = [sys.executable]
    else:
        raise ValueError(launcher)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    done = subprocess.run(
        [*cmd, str(path), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    )
    return done
