"""Chat fine-tuning with TRL and HiFT: a ``messages`` dataset, the loss on the assistant's answer.

Run::

    python examples/chat_sft.py --model HuggingFaceTB/SmolLM2-135M-Instruct --data chats.jsonl

``--model`` is a Hugging Face Hub id or a local model directory with a chat template, ``--data``
a JSONL (or JSON, CSV, Parquet) file whose rows hold ``messages``, the conversational format of
TRL and the Hub: ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant",
"content": "..."}]}``. Each conversation becomes a prompt (every turn before the last) and a
completion (the last, assistant turn), TRL's conversational prompt-completion form, so the loss
is on the answer only. Only the trainer class differs from plain TRL: ``HiFTSFTTrainer`` trains
one group of layers per step.
"""

import argparse

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

from hiftune import HiFTConfig
from hiftune.integrations.transformers import HiFTSFTTrainer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True, help="Hub id or local model directory")
parser.add_argument("--data", required=True, help="file with a 'messages' column")
parser.add_argument("--output-dir", default="runs/chat-sft")
parser.add_argument("--epochs", type=float, default=1.0)
parser.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; overrides epochs")
parser.add_argument("--lr", type=float, default=1e-5)
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--units-per-group", type=int, default=1)
args = parser.parse_args()

suffix = args.data.rsplit(".", 1)[-1]
builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}[suffix]
dataset = load_dataset(builder, data_files=args.data, split="train")


def to_prompt_completion(row: dict) -> dict:
    # The last turn is the answer to learn; the turns before it are the context it answers.
    return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}


dataset = dataset.map(to_prompt_completion, remove_columns=dataset.column_names)

model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(args.model)
config = SFTConfig(
    output_dir=args.output_dir,
    num_train_epochs=args.epochs,
    max_steps=args.max_steps,
    per_device_train_batch_size=args.batch_size,
    learning_rate=args.lr,  # HiFT counts the schedule in cycles of all groups
    lr_scheduler_type="linear",
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    use_cpu=not torch.cuda.is_available(),
)
trainer = HiFTSFTTrainer(
    model=model,
    args=config,
    train_dataset=dataset,
    processing_class=tokenizer,
    hift_config=HiFTConfig(units_per_group=args.units_per_group),
)
trainer.train()
trainer.save_model(args.output_dir)
losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
print(f"{len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; saved to {args.output_dir}")
