"""One HiFTTrainer run as a script: for torchrun, accelerate launch, or one plain process.

Every rank writes ``info-<world>-<rank>.json`` (what it measured) into ``--out``; rank 0 also writes
the trained weights (``weights-<world>.pt``). The global batch is fixed (8 rows per micro-batch over
all ranks) and the data is read in order, so any number of processes sees the same optimizer steps.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import transformers as T

from hiftune import HiFTConfig
from hiftune.engine.distributed import is_sharded
from hiftune.engine.state.store import tensor_bytes
from hiftune.integrations.transformers import HiFTTrainer, unwrap_hift
from hiftune.memory.measure import PeakMemory, current_memory_mib
from tinymodels import tiny_hf_config

GLOBAL_BATCH = 8


def dataset(n: int = 64, vocab: int = 64) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(2, vocab, (8,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


class StepProbe(T.TrainerCallback):
    """The largest gradient bytes held by the model and by the active group at any step, and the
    number of optimizer steps this process took."""

    def __init__(self) -> None:
        self.grad_bytes = 0
        self.active_bytes = 0
        self.steps = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        hift = unwrap_hift(optimizer)
        self.steps += 1
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.grad_bytes = max(self.grad_bytes, tensor_bytes(grads))
        self.active_bytes = max(self.active_bytes, tensor_bytes(hift.active_parameters()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--save-steps", type=int, default=4)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--per-device", type=int, default=0, help="0: the global batch / world")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--offload", default="host")
    parser.add_argument("--shard-state", action="store_true")
    parser.add_argument("--fsdp", action="store_true", help="shard the blocks with FSDP2 first")
    opts = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = tiny_hf_config("llama")
    config.hidden_size, config.intermediate_size = opts.hidden, 2 * opts.hidden
    model = T.AutoModelForCausalLM.from_config(config)
    hift_config = HiFTConfig(offload=opts.offload, shard_state=opts.shard_state)
    if opts.fsdp:
        import torch.distributed as dist

        from hiftune.engine.fsdp import shard_by_units

        dist.init_process_group("gloo")
        hift_config = shard_by_units(model, hift_config)
    args = T.TrainingArguments(
        opts.out,
        per_device_train_batch_size=opts.per_device or GLOBAL_BATCH // world,
        gradient_accumulation_steps=opts.accum,
        max_steps=opts.max_steps,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        weight_decay=0.1,
        max_grad_norm=1.0,
        save_steps=opts.save_steps,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
    )
    probe = StepProbe()
    trainer = HiFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset(),
        hift_config=hift_config,
        callbacks=[probe],
    )
    meter = PeakMemory()
    base = current_memory_mib()
    meter.reset()
    trainer.train(resume_from_checkpoint=opts.resume)
    peak = meter.peak() - base
    hift = unwrap_hift(trainer.optimizer)
    out = Path(opts.out)
    info = {
        "wrapped": type(trainer.model_wrapped).__name__,
        "grad_bytes": probe.grad_bytes,
        "active_bytes": probe.active_bytes,
        "peak_mib": peak,
        "steps": hift.steps,
        "steps_here": probe.steps,
        "cycle": hift.cycle,
        "stored": hift.store.resident_bytes(),
    }
    (out / f"info-{world}-{rank}.json").write_text(json.dumps(info))
    # An FSDP2 model's parameters are shards: gather them (a collective, on every rank).
    weights = {
        n: (p.full_tensor() if is_sharded(p) else p).detach().clone()
        for n, p in model.named_parameters()
    }
    if rank == 0:
        torch.save(weights, out / f"weights-{world}.pt")
    if torch.distributed.is_initialized():
        # Left to interpreter exit, gloo's threads can abort the process ("terminate called
        # without an active exception"), failing a run that did everything right.
        torch.distributed.barrier()  # rank 0 may still be saving: leave together
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
