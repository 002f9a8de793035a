"""Per-rank peak memory and step time of HiFT on 1 and 2 processes: the table of docs/distributed.md.

For one process, then for each mode (``dp``: data parallel; ``sharded``: data parallel with ``shard_state=True``;
``fsdp2``: blocks sharded with FSDP2 by ``hiftune.engine.fsdp.shard_by_units``)  on two processes,
this script launches itself under ``torch.distributed.run`` (gloo, CPU, one torch
thread per process) and trains a Llama-architecture model (hidden 512, 4 layers, vocabulary 8192,
random weights: 18.9M parameters) with AdamW for two HiFT cycles, on the same global batch of 8
sequences of 64 tokens whatever the number of processes. Each rank measures the peak of its
resident set from building the model to the end of training, above what it held before (``hiftune.memory.measure.PeakMemory``,
with glibc's mmap threshold at 64 KiB so that freed tensors leave the resident set) and the
median optimizer step time of the second cycle; the predicted per-rank memory
(``hiftune.memory.distributed.estimate_per_rank``: weights, gradients, optimizer state and masters,
device + paged) is printed next to it, alone and with the saved activations of the rank's share of
the batch as ``hiftune.memory.estimate`` estimates them.

Run from the repository root::

    .venv/bin/python benchmarks/distributed_ranks.py [--out docs/distributed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("dp", "sharded", "fsdp2")
#: (mode, processes): one process is the same run in every mode, so it runs once.
RUNS = (("dp", 1), ("dp", 2), ("sharded", 2), ("fsdp2", 2))
GLOBAL_BATCH = 8
SEQ = 64


def _config():  # type: ignore[no-untyped-def]
    import transformers as T

    return T.LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )


def worker(mode: str, out: Path) -> None:
    """One rank's run (under ``torch.distributed.run``, or alone for one process)."""
    import torch
    import torch.distributed as dist
    import transformers as T

    from hiftune import HiFTConfig, HiFTOptimizer
    from hiftune.engine.fsdp import shard_by_units
    from hiftune.memory.measure import PeakMemory, current_memory_mib

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    meter = PeakMemory()
    base = current_memory_mib()
    meter.reset()
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(_config())
    config = HiFTConfig(shard_state=mode == "sharded")
    if mode == "fsdp2" and world > 1:
        config = shard_by_units(model, config)
    g = torch.Generator().manual_seed(1)
    per_rank = GLOBAL_BATCH // world
    opt = HiFTOptimizer(model, torch.optim.AdamW, config, lr=1e-4)
    times = []
    for _ in range(2 * opt.num_groups):
        ids = torch.randint(0, 8192, (GLOBAL_BATCH, SEQ), generator=g)
        mine = ids[rank * per_rank : (rank + 1) * per_rank]
        start = time.perf_counter()
        model(input_ids=mine, labels=mine).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    peak = meter.peak() - base
    opt.close()
    result = {
        "mode": mode,
        "processes": world,
        "rank": rank,
        "peak_mib": round(peak, 1),
        "step_s": round(statistics.median(times[opt.num_groups :]), 4),
    }
    (out / f"{mode}-{world}-{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.dir)
        return
    from hiftune.memory.distributed import estimate_per_rank
    from hiftune.memory.estimate import estimate

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, n in RUNS:
            cmd = [sys.executable]
            if n > 1:
                cmd += ["-m", "torch.distributed.run", f"--nproc-per-node={n}"]
            cmd += [__file__, "--worker", mode, "--dir", tmp]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
            predicted = estimate_per_rank(_config(), processes=n, mode=mode)
            # The saved activations of this rank's share of the batch (estimated on meta).
            hift = [
                row
                for row in estimate(
                    _config(),
                    optimizers=["adamw"],
                    precisions=["fp32"],
                    batch_size=GLOBAL_BATCH // n,
                    seq_len=SEQ,
                )
                if row.method == "hift"
            ]
            # The loss's logits are their own figure now; this column has always held both.
            activations = (hift[0].activations_mib_estimate or 0.0) + (
                hift[0].logits_mib_estimate or 0.0
            )
            for r in range(n):
                got = json.loads((Path(tmp) / f"{mode}-{n}-{r}.json").read_text())
                got["predicted_mib"] = round(predicted[r].total_mib, 1)
                got["activations_mib"] = round(activations, 1)
                rows.append(got)
    lines = [
        "| mode | processes | rank | measured peak (MiB) | predicted: weights, grads, state "
        "(MiB) | + activations estimate (MiB) | step (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['processes']} | {r['rank']} | {r['peak_mib']} | "
            f"{r['predicted_mib']} | {r['predicted_mib'] + r['activations_mib']:.1f} | "
            f"{r['step_s']} |"
        )
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
