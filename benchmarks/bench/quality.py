"""Quality and time to quality on the bundled sentiment task, the same loop for every method.

Two workloads (``hiftune.recipes``: the bundled models and the fixed splits of the bundled
sentiment data): SmolLM2-135M-Instruct as a prompt classifier (``"{text} It was"`` scored at
``terrible``/``great``, the loss is the cross-entropy over those two words' logits) and MiniLM-L6
with a new sequence-classification head. Every method gets the same training subset, batches,
epochs, linear LR decay and learning-rate grid. A run evaluates on the validation subset at a few
points during training (accuracy vs training wall time, evaluation excluded) and on the test
subset at the end. The learning rate of each method is chosen by final validation accuracy at
seed 0; the other seeds then run at that rate.

    python -m bench.quality --method lora-r8 --task smollm2 --lr 1e-4 --seed 0 --out run.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import adapters, methods, runner
from .workload import DTYPES

logger = logging.getLogger(__name__)

#: Workload name -> the bundled model preset and task (``hiftune train --model/--task``).
TASKS = {
    "smollm2": {"model": "smollm2-135m", "task": "prompt-cls"},
    "minilm": {"model": "minilm-l6", "task": "seq-cls"},
}
#: Methods of the quality runs (and per-workload options that differ from the speed runs).
QUALITY_METHODS = (
    "fpft-fp32",
    "hift-fp32-host",
    "hift-bf16-disk",
    "lora-r8",
    "lora-r64",
    "badam",
    "badam-all",
    "lomo",
    "galore",
    "adam-mini",
    "apollo",
    "adamw-8bit",
)


@dataclass
class Settings:
    """The budget of one workload, the same for every method."""

    train_samples: int = 400
    val_samples: int = 200
    test_samples: int = 500
    epochs: int = 1
    batch_size: int = 8
    max_length: int = 128
    evals: int = 3
    grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3)
    seeds: tuple[int, ...] = (0, 1)
    methods: tuple[str, ...] = field(default=QUALITY_METHODS)


#: ``make bench``: per workload its budget. SmolLM2 steps cost ~3-4 s on one thread, so its runs
#: are fewer and shorter (about 2 minutes each) to keep the whole benchmark within 90 minutes.
FULL = {
    "minilm": Settings(methods=tuple(m for m in QUALITY_METHODS if m != "badam")),
    "smollm2": Settings(
        train_samples=160,
        val_samples=64,
        test_samples=200,
        evals=2,
        # Every method's best rate fell in [1e-4, 1e-3] in the first full run (none at 1e-5),
        # so the grid is finer there.
        grid=(1e-4, 3e-4, 1e-3),
        methods=("fpft-fp32", "hift-bf16-disk", "lora-r8", "badam", "lomo", "galore"),
    ),
}
#: A reduced setting that only shows the machinery works (minutes, not an hour).
REDUCED = {
    "minilm": Settings(
        train_samples=96,
        val_samples=64,
        test_samples=128,
        evals=2,
        grid=(1e-4,),
        seeds=(0,),
        methods=("fpft-fp32", "hift-bf16-disk", "lora-r8", "badam-all", "lomo", "adamw-8bit"),
    ),
    "smollm2": Settings(
        train_samples=48,
        val_samples=32,
        test_samples=64,
        evals=2,
        grid=(1e-4,),
        seeds=(0,),
        methods=("fpft-fp32", "hift-bf16-disk", "lora-r8", "lomo"),
    ),
}


# --- one run (in the worker process) -----------------------------------------------------------


def _data(task: str, tokenizer: Any, s: Settings) -> tuple[list[Any], list[Any], list[Any], Any]:
    from hiftune.recipes import data

    splits = data.sentiment_splits()
    train = data.subsample(splits["train"], s.train_samples, seed=0)
    val = splits["validation"][: s.val_samples]
    test = splits["test"][: s.test_samples]
    if task == "prompt-cls":
        fmt = data.PromptFormat()
        enc = [data.encode_prompt_cls(r, tokenizer, fmt, s.max_length) for r in (train, val, test)]
        collate = data.PadCollator(tokenizer.pad_token_id, side="left", position_ids=True)
        return enc[0], enc[1], enc[2], (collate, fmt.label_token_ids(tokenizer))
    enc = [data.encode_seq_cls(r, tokenizer, s.max_length) for r in (train, val, test)]
    return enc[0], enc[1], enc[2], (data.PadCollator(tokenizer.pad_token_id), None)


def _logits(model: nn.Module, batch: dict[str, torch.Tensor], label_ids: Any) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if label_ids is None:  # sequence classification
        return model(**inputs).logits.float()
    # Prompt classification: the next-token scores of the label words after the prompt.
    out = model(**inputs, logits_to_keep=1).logits[:, -1]
    return out[:, label_ids].float()


def _accuracy(model: nn.Module, rows: list[Any], collate: Any, label_ids: Any, bs: int) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(rows), bs):
            batch = collate(rows[i : i + bs])
            pred = _logits(model, batch, label_ids).argmax(-1)
            right += int((pred == batch["labels"]).sum())
    model.train()
    return right / max(1, len(rows))


def _badam_blocks(model: nn.Module) -> list[list[str]]:
    # MiniLM (BERT) names its blocks encoder.layer.N, which BAdam's name inference (``layers.N``)
    # does not see, so the blocks are given, as BAdam documents: embeddings, each layer, and the
    # rest (pooler and the new classification head).
    names = [n for n, _ in model.named_parameters()]
    layers = sorted({".".join(n.split(".")[:4]) + "." for n in names if ".layer." in n})
    rest = [n for n in names if ".layer." not in n and "embeddings" not in n]
    return [["embeddings."], *[[p] for p in layers], rest]


def run(method: methods.Method, workload: str, lr: float, seed: int, s: Settings) -> dict[str, Any]:
    """Trains ``method`` on ``workload`` and returns the accuracy curve and final accuracies."""
    from hiftune.recipes.models import load_model_and_tokenizer, resolve_model

    torch.set_num_threads(1)
    random.seed(seed)
    torch.manual_seed(seed)
    spec = TASKS[workload]
    model, tokenizer = load_model_and_tokenizer(resolve_model(spec["model"]), spec["task"])
    if method.family != "hift":
        # HiFT's mixed^Hi takes the fp32 checkpoint and keeps fp32 masters of it; every other
        # bf16 method starts from a bf16 model, as with a bf16 checkpoint.
        model = model.to(DTYPES[method.dtype])
    train, val, test, (collate, label_ids) = _data(spec["task"], tokenizer, s)
    steps_per_epoch = -(-len(train) // s.batch_size)
    total = steps_per_epoch * s.epochs
    options = dict(method.options)
    if method.family == "hift":
        options["units_per_group"] = methods.QUALITY_UNITS_PER_GROUP
    if method.family == "lora" and spec["task"] == "seq-cls":
        options["task_type"] = "SEQ_CLS"
    if method.family == "badam":
        # BAdam's own inference: one block per decoder layer, plus embedding and head if asked.
        n_blocks = model.config.num_hidden_layers + 2 * ("include_embedding" in options)
        if spec["task"] == "seq-cls":
            options = {"block_prefix_list": _badam_blocks(model)}
            n_blocks = len(options["block_prefix_list"])
        # One pass over the blocks within the budget (BAdam's default of 50 steps per block
        # would visit only total/50 of them).
        options["switch_block_every"] = max(1, total // n_blocks)

    def loss_fn(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(_logits(m, batch, label_ids), batch["labels"])

    trainer = adapters.load(method.family).build(model, loss_fn, lr, total, **options)
    net = trainer.model
    eval_at = {round(total * (i + 1) / s.evals) for i in range(s.evals)}
    curve: list[dict[str, Any]] = []
    rng = random.Random(seed)
    train_s, step, losses = 0.0, 0, []
    for _ in range(s.epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for i in range(0, len(order), s.batch_size):
            batch = collate([train[j] for j in order[i : i + s.batch_size]])
            t = time.perf_counter()
            losses.append(trainer.step(batch))
            train_s += time.perf_counter() - t
            step += 1
            if step in eval_at:
                acc = _accuracy(net, val, collate, label_ids, 16)
                curve.append({"step": step, "train_s": train_s, "val_acc": acc})
    test_acc = _accuracy(net, test, collate, label_ids, 16)
    trainer.close()
    return {
        "method": method.name,
        "workload": workload,
        "lr": lr,
        "seed": seed,
        "steps": step,
        "train_s": train_s,
        "curve": curve,
        "val_acc": curve[-1]["val_acc"],
        "test_acc": test_acc,
        "losses": losses,
    }


# --- the runner (parent process) ---------------------------------------------------------------


def _launch(method: str, workload: str, lr: float, seed: int, s: Settings, logs: Path) -> dict:
    logs.mkdir(parents=True, exist_ok=True)
    stem = f"{workload}-{method}-lr{lr:g}-s{seed}"
    out, log = logs / f"{stem}.json", logs / f"{stem}.log"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.quality", "--method", method, "--task", workload]
    cmd += ["--lr", repr(lr), "--seed", str(seed), "--settings", json.dumps(asdict(s))]
    cmd += ["--out", str(out)]
    env = runner.worker_env()
    t = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    if out.is_file():
        r = json.loads(out.read_text())
    else:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        r = {"method": method, "workload": workload, "lr": lr, "seed": seed, "error": str(tail)}
    r["wall_s"] = time.perf_counter() - t
    if "error" in r:
        logger.warning("%s: %s", stem, r["error"])
    else:
        logger.info(
            "%s: val %.3f test %.3f (%.0f s)", stem, r["val_acc"], r["test_acc"], r["wall_s"]
        )
    return r


def run_all(plan: dict[str, Settings], logs: Path, name: str = "full") -> dict[str, Any]:
    """Per workload: the LR search at the first seed for every method, then the other seeds at
    each method's best rate (by validation accuracy)."""
    started = runner.machine_load()
    out: dict[str, Any] = {}
    for workload, s in plan.items():
        results: list[dict[str, Any]] = []
        for method in s.methods:
            search = [_launch(method, workload, lr, s.seeds[0], s, logs) for lr in s.grid]
            results += search
            ok = [r for r in search if "error" not in r]
            if not ok:
                continue
            best = max(ok, key=lambda r: (r["val_acc"], -r["lr"]))["lr"]
            results += [_launch(method, workload, best, seed, s, logs) for seed in s.seeds[1:]]
        out[workload] = {"settings": asdict(s), "results": results}
    return {
        "started": started,
        "finished": runner.machine_load(),
        "plan": name,
        "hift_units_per_group": methods.QUALITY_UNITS_PER_GROUP,
        "workloads": out,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", required=True, choices=methods.BY_NAME)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", default="{}", help="JSON of Settings fields")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    fields: dict[str, Any] = json.loads(a.settings)
    kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    s = Settings(**kwargs)
    try:
        result = run(methods.get(a.method), a.task, a.lr, a.seed, s)
        code = 0
    except Exception as e:
        traceback.print_exc()
        result = {"method": a.method, "workload": a.task, "lr": a.lr, "seed": a.seed}
        result["error"] = (
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        )
        code = 1
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
