"""HiFT inside ``transformers.Trainer``: only the optimizer and scheduler change.

Run: ``python examples/trainer.py`` (a small llama from a config on random tokens, seconds on CPU).
Swap in your own model, dataset and ``TrainingArguments``; for TRL use ``HiFTSFTTrainer``.
"""

import argparse
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from hiftune import HiFTConfig
from hiftune.integrations.transformers import HiFTTrainer

parser = argparse.ArgumentParser()
parser.add_argument("--max-steps", type=int, default=36)
parser.add_argument("--output-dir", default=None)
args = parser.parse_args()

torch.manual_seed(0)
model = LlamaForCausalLM(
    LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
)
rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 256, (64, 32)).tolist()]

training_args = TrainingArguments(
    args.output_dir or tempfile.mkdtemp(prefix="hiftune-example-"),
    max_steps=args.max_steps,  # optimizer steps; one group per step, k = 6 steps per cycle
    per_device_train_batch_size=8,
    gradient_accumulation_steps=2,  # both micro-batches train the same group
    learning_rate=3e-3,
    lr_scheduler_type="cosine",  # counted in cycles by HiFTTrainer, and delayed
    warmup_steps=0,  # counted in cycles too: a linear warm-up starts with a whole cycle at LR 0
    max_grad_norm=1.0,  # clips the active group only
    logging_steps=6,
    save_steps=18,  # checkpoints hold the HiFT queue, order and every group's state
    report_to=[],
    use_cpu=not torch.cuda.is_available(),
)
trainer = HiFTTrainer(
    model=model,
    args=training_args,
    train_dataset=rows,
    hift_config=HiFTConfig(units_per_group=1, order="bottom2up"),
)
trainer.train()
