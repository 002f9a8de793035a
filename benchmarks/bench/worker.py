"""Measures one configuration in this (fresh) process and writes one JSON object.

    python -m bench.worker --method hift-bf16-disk --batch-size 1 --out result.json

Memory: ``hiftune.memory.measure.PeakMemory`` (on Linux the kernel's high-water mark of the
resident set, ``VmHWM``, reset through ``/proc/self/clear_refs``) read twice: once for the setup
(imports, model, method), then reset and read again over the training steps. The reported peak is
the larger of the two, i.e. the whole process's peak resident set, Python and libraries included
(``runtime_mib`` is the resident set after the imports, before the model exists).

Time: wall and CPU time of each timed step, after ``--warmup`` steps. Methods whose step depends
on which block is active (HiFT, BAdam) are timed over exactly one cycle of blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from hiftune.memory.measure import PeakMemory, current_memory_mib

from . import adapters, methods, workload


def measure(
    method: methods.Method,
    model: str = "smollm2-135m",
    batch_size: int = 1,
    seq_len: int = 128,
    warmup: int = 1,
    steps: int = 3,
    threads: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Trains ``method`` on random batches and returns its peak memory and step times."""
    torch.set_num_threads(threads)
    meter = PeakMemory()
    module = adapters.load(method.family)  # imports the method's package before the baseline
    workload.import_model_code(model)  # and the model's code, for every method alike
    runtime = current_memory_mib()
    net = workload.make_model(model, method.dtype, seed)
    options = dict(method.options)
    if method.family == "badam":
        # One block per step, so that one timed cycle visits every block (BAdam's default of 50
        # steps per block would time only the top block, the cheapest).
        options["switch_block_every"] = 1
    trainer = module.build(net, workload.lm_loss, 1e-5, 10_000, **options)
    cycle = _cycle_length(trainer) if method.cyclic else 0
    timed = cycle or steps
    config: Any = net.config
    vocab = int(config.vocab_size)
    batches = workload.random_batches(vocab, batch_size, seq_len, warmup + timed, seed)
    setup_peak = meter.peak()
    meter.reset()
    walls, cpus, switches, losses = [], [], [], []
    for i, batch in enumerate(batches):
        w, c = time.perf_counter(), time.process_time()
        s = getattr(trainer, "switch_s", 0.0)
        losses.append(trainer.step(batch))
        if i >= warmup:
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
            switches.append(getattr(trainer, "switch_s", 0.0) - s)
    train_peak = meter.peak()
    trainer.close()
    meter.close()
    if not all(map(_finite, losses)):
        raise FloatingPointError(f"non-finite loss: {losses}")
    return {
        "method": method.name,
        "model": model,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "threads": threads,
        "warmup": warmup,
        "timed_steps": timed,
        "cycle": cycle,
        "runtime_mib": runtime,
        "setup_peak_mib": setup_peak,
        "train_peak_mib": train_peak,
        "peak_mib": max(setup_peak, train_peak),
        "peak_method": meter.method,
        "step_s": walls,
        "cpu_s": cpus,
        "mean_step_s": sum(walls) / len(walls),
        "mean_cpu_s": sum(cpus) / len(cpus),
        # BAdam only: time spent switching blocks (it switches every step here).
        "mean_switch_s": sum(switches) / len(switches),
        "losses": losses,
    }


def _cycle_length(trainer: adapters.Trainer) -> int:
    opt: Any = trainer.optimizer
    if hasattr(opt, "num_groups"):  # HiFTOptimizer
        return int(opt.num_groups)
    if hasattr(opt, "block_num"):  # BAdam's BlockOptimizer
        return int(opt.block_num)
    raise TypeError(f"no cycle length for {type(opt).__name__}")


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", required=True, choices=methods.BY_NAME)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps (non-cyclic methods)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    method = methods.get(a.method)
    try:
        result = measure(
            method, a.model, a.batch_size, a.seq_len, a.warmup, a.steps, a.threads, seed=0
        )
        code = 0
    except Exception as e:  # recorded as the reason the method could not run
        traceback.print_exc()
        result = {"method": method.name, "batch_size": a.batch_size, "error": _one_line(e)}
        code = 1
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    sys.stdout.flush()
    os._exit(code)  # skip interpreter teardown: some packages' atexit hooks are slow


def _one_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".strip()


if __name__ == "__main__":
    main()
