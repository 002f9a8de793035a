"""HiFT in a plain PyTorch loop: a small llama built from a config, trained on random tokens.

Run: ``python examples/plain_pytorch.py`` (about ten seconds on a laptop CPU).
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hiftune import HiFTConfig, HiFTOptimizer

parser = argparse.ArgumentParser()
parser.add_argument("--cycles", type=int, default=6)
parser.add_argument("--offload", default="host", choices=["none", "host", "disk"])
args = parser.parse_args()

torch.manual_seed(0)
# 4 blocks -> n = 6 units (embedding, 4 blocks, head) -> k = 6 groups with one unit each.
model = LlamaForCausalLM(
    LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
)
config = HiFTConfig(
    units_per_group=1,  # m: one unit per step; larger m = fewer, bigger steps and more memory
    order="bottom2up",  # the paper finds the order matters little
    offload=args.offload,  # where idle groups' AdamW state waits (host RAM or disk)
)
opt = HiFTOptimizer(model, torch.optim.AdamW, config, lr=3e-3, weight_decay=0.0)
# Delayed LR: the schedule counts cycles, so every group sees the same LR within a cycle.
sched = opt.delay(torch.optim.lr_scheduler.LambdaLR(opt, lambda c: 1 - c / args.cycles))
print(f"{len(opt.groups)} groups: {opt.group_names}")

# A fixed batch of random tokens: the loss must go down as every group gets trained.
data = torch.randint(0, 256, (8, 32))
for step in range(args.cycles * opt.num_groups):
    trained = opt.group_names[opt.active_group]
    loss = model(input_ids=data, labels=data).loss
    loss.backward()
    opt.clip_grad_norm_(1.0)  # clips the active group, the only one with gradients
    opt.step()  # updates `trained`, pages its state out, activates the next group
    sched.step()
    opt.zero_grad()
    if step % opt.num_groups == opt.num_groups - 1:
        print(f"cycle {opt.cycle}: loss {loss.item():.3f} (last group trained: {trained})")
opt.close()
