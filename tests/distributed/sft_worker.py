"""One HiFTSFTTrainer (TRL) run as a script, for torchrun or one plain process.

Each rank writes the trained weights and what wraps the model to ``--out``/``rank-<rank>.pt``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import transformers as T
import trl
from datasets import Dataset

from hiftune import HiFTConfig
from hiftune.integrations.transformers import HiFTSFTTrainer, unwrap_hift
from tinymodels import tiny_hf_config, word_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(tiny_hf_config("llama"))
    texts = [" ".join(f"w{(i * j + i) % 61}" for j in range(6)) for i in range(32)]
    args = trl.SFTConfig(
        opts.out,
        max_steps=10,
        per_device_train_batch_size=8 // world,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        train_sampling_strategy="sequential",
        seed=0,
    )
    trainer = HiFTSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"text": t} for t in texts]),
        processing_class=tokenizer,
        hift_config=HiFTConfig(),
    )
    trainer.train()
    hift = unwrap_hift(trainer.optimizer)
    result = {
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "wrapped": type(trainer.model_wrapped).__name__,
        "cycle": hift.cycle,
    }
    torch.save(result, Path(opts.out) / f"rank-{os.environ.get('RANK', '0')}.pt")
    if torch.distributed.is_initialized():  # not at interpreter exit: gloo's threads may abort
        torch.distributed.barrier()  # a rank that leaves first must not tear down the group
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
