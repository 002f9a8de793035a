"""Quality and time to quality: one worker run (or several in one process), the same loop for
every method.

The tasks are :mod:`bench.qtasks`'s, the plan (budgets, rates, seeds) :mod:`bench.quality_plan`'s.
Every method of a budget gets the same training subset, batches, epochs and linear LR decay. A
run evaluates on the validation subset at a few points during training (accuracy vs training
wall time, evaluation excluded) and on the test subset at the end, and counts the weight
elements each step updates ("updates per weight").

    python -m bench.quality --method hift-b --task minilm --jobs '[[1e-4, 0]]' \
        --options '{"units_per_group": 4}' --out runs.json
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
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import adapters, methods, quality_plan, runner
from .qtasks import TASKS, Task
from .quality_plan import Settings
from .workload import DTYPES

logger = logging.getLogger(__name__)


# --- one run (in the worker process) -----------------------------------------------------------


def _data(task: Task, tokenizer: Any, s: Settings) -> tuple[list[Any], list[Any], list[Any], Any]:
    from hiftune.recipes import data

    from .qtasks import splits

    parts = splits(task)
    train = data.subsample(parts["train"], s.train_samples, seed=0)
    val = parts["validation"][: s.val_samples]
    test = parts["test"][: s.test_samples]
    if task.kind == "prompt-cls":
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


def _badam_blocks(model: nn.Module, active: tuple[str, ...]) -> list[list[str]]:
    # MiniLM (BERT) names its blocks encoder.layer.N, which BAdam's name inference (``layers.N``)
    # does not see, so the blocks are given, as BAdam documents: embeddings, each layer, and the
    # rest (the pooler) without the always-active modules (the new head).
    names = [n for n, _ in model.named_parameters()]
    layers = sorted({".".join(n.split(".")[:4]) + "." for n in names if ".layer." in n})
    rest = [
        n
        for n in names
        if ".layer." not in n and "embeddings" not in n and not any(a in n for a in active)
    ]
    return [["embeddings."], *[[p] for p in layers], *([rest] if rest else [])]


def run(
    method: methods.Method,
    task_name: str,
    lr: float,
    seed: int,
    s: Settings,
    options: dict[str, Any],
) -> dict[str, Any]:
    """Trains ``method`` (with the adapter's ``options``) on a task; returns the accuracy curve,
    final accuracies and updates per weight."""
    from hiftune.recipes.models import load_model_and_tokenizer, resolve_model

    torch.set_num_threads(1)
    random.seed(seed)
    torch.manual_seed(seed)
    task = TASKS[task_name]
    model, tokenizer = load_model_and_tokenizer(
        resolve_model(task.model), task.kind, task.num_labels
    )
    if method.family != "hift":
        # A bf16 method (BAdam) starts from a bf16 model, as with a bf16 checkpoint.
        model = model.to(DTYPES[method.dtype])
    train, val, test, (collate, label_ids) = _data(task, tokenizer, s)
    total = -(-len(train) // s.batch_size) * s.epochs
    options = dict(options)
    if method.family == "badam" and task.kind == "seq-cls":
        options["block_prefix_list"] = _badam_blocks(
            model, tuple(options.get("active_modules", ()))
        )
    weights = sum(p.numel() for p in model.parameters())

    def loss_fn(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(_logits(m, batch, label_ids), batch["labels"])

    trainer = adapters.load(method.family).build(model, loss_fn, lr, total, **options)
    net = trainer.model
    evals = s.seed_evals if s.seed_evals and seed != s.seeds[0] else s.evals
    eval_at = {round(total * (i + 1) / evals) for i in range(evals)}
    curve: list[dict[str, Any]] = []
    rng = random.Random(seed)
    train_s, step, losses, updated = 0.0, 0, [], 0
    for _ in range(s.epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for i in range(0, len(order), s.batch_size):
            batch = collate([train[j] for j in order[i : i + s.batch_size]])
            updated += trainer.updated_numel()  # before the step: what it will update
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
        "task": task_name,
        "lr": lr,
        "seed": seed,
        "steps": step,
        "train_s": train_s,
        "curve": curve,
        "val_acc": curve[-1]["val_acc"],
        "test_acc": test_acc,
        "updates_per_weight": updated / weights,
        "losses": losses,
    }


# --- the runner (parent process) ---------------------------------------------------------------


def launch(
    method: str,
    task: str,
    budget: str,
    s: Settings,
    options: dict[str, Any],
    jobs: list[tuple[float, int]],
    logs: Path,
) -> list[dict[str, Any]]:
    """Runs ``jobs`` (``(lr, seed)`` pairs) of one method, one after the other, in one fresh
    worker process (one torch thread); a failed job becomes ``{"error": reason}``."""
    logs.mkdir(parents=True, exist_ok=True)
    stem = f"{task}-{budget}-{method}-" + "_".join(f"lr{lr:g}s{seed}" for lr, seed in jobs)
    out, log = logs / f"{stem}.json", logs / f"{stem}.log"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.quality", "--method", method, "--task", task]
    cmd += ["--jobs", json.dumps(jobs), "--settings", json.dumps(asdict(s))]
    cmd += ["--options", json.dumps(options), "--out", str(out)]
    with open(log, "w") as f:
        subprocess.run(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=runner.worker_env(), check=False
        )
    done = json.loads(out.read_text()) if out.is_file() else []
    by_job = {(r["lr"], r["seed"]): r for r in done}
    tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
    results = []
    for lr, seed in jobs:
        r = by_job.get((lr, seed)) or {"method": method, "lr": lr, "seed": seed, "error": str(tail)}
        r["budget"] = budget
        if "error" in r:
            logger.warning("%s %s %s lr %g seed %d: %s", task, budget, method, lr, seed, r["error"])
        else:
            logger.info(
                "%s %s %s lr %g seed %d: val %.3f test %.3f, %d steps in %.1f s, %.1f updates/weight",
                task, budget, method, lr, seed, r["val_acc"], r["test_acc"], r["steps"],
                r["train_s"], r["updates_per_weight"],
            )  # fmt: skip
        results.append(r)
    return results


def _run_key(
    budget: str, settings: Mapping[str, Any], method: str, options: Any, lr: float, seed: int
) -> str:
    """What makes two runs the same run: budget, settings (but the list of methods, which does
    not change a run), method, options, rate and seed."""
    sized = {k: v for k, v in settings.items() if k != "methods"}
    return json.dumps([budget, sized, method, options, lr, seed], sort_keys=True)


def _earlier_runs(earlier: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The finished runs of an earlier result of a task, by :func:`_run_key`."""
    done: dict[str, dict[str, Any]] = {}
    for budget, block in (earlier or {}).get("budgets", {}).items():
        for r in block["results"]:
            if "error" not in r:
                opts = block["options"][r["method"]]
                key = _run_key(budget, block["settings"], r["method"], opts, r["lr"], r["seed"])
                done[key] = r
    return done


def _run_task(
    task_name: str,
    tp: quality_plan.TaskPlan,
    logs: Path,
    earlier: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    task = TASKS[task_name]
    facts = quality_plan.task_facts(task)
    logger.info("%s: %s", task_name, {k: v for k, v in facts.items() if k != "new_params"})
    blocks: dict[str, Any] = {}
    done = _earlier_runs(earlier)

    def go(budget: str, s: Settings, start: dict[str, float] | None = None) -> dict[str, Any]:
        settings = asdict(s)

        def one(method: str, options: dict[str, Any], jobs: list[tuple[float, int]]) -> list:
            # A run an earlier invocation finished (same settings and options) is not run again.
            keys = [_run_key(budget, settings, method, options, lr, seed) for lr, seed in jobs]
            todo = [job for job, key in zip(jobs, keys, strict=True) if key not in done]
            ran = launch(method, task_name, budget, s, options, todo, logs) if todo else []
            fresh = {(r["lr"], r["seed"]): r for r in ran}
            return [done.get(k) or fresh[job] for job, k in zip(jobs, keys, strict=True)]

        return quality_plan.search_budget(task, s, facts, one, start)

    blocks["short"] = go("short", tp.short)
    if tp.long is not None:
        blocks["long"] = go("long", tp.long, blocks["short"]["chosen"])
    if tp.equal_time:
        for name in tp.equal_time_methods:
            eq = quality_plan.equal_time_settings(tp.short, blocks["short"], name)
            if eq is not None:
                blocks["equal-time"] = go("equal-time", eq)
    return {"label": task.label, "facts": facts, "budgets": blocks}


def run_all(
    p: quality_plan.Plan,
    logs: Path,
    previous: Mapping[str, Any] | None = None,
    save: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Per task: the short budget, the long one (grids around the short budget's rates), then the
    equal-wall-time budget of hiftune's defaults.

    Args:
        p: The plan (or some of its tasks).
        logs: Where each run's log and JSON go.
        previous: An earlier result of the same plan: its other tasks are kept, so that tasks run
            by separate invocations (``--tasks``) add up to one result, and its finished runs
            are reused where a task runs again (a method added to the plan runs alone).
        save: Called with the result so far after each task, so that an interrupted run keeps
            the tasks it finished.
    """
    out: dict[str, Any] = {}
    if previous is not None and previous.get("plan") == p.name:
        out = dict(previous.get("tasks", {}))
    result = {
        "format": 2,
        "started": runner.machine_load(),
        "plan": p.name,
        "estimate_minutes": quality_plan.estimate_minutes(p.tasks),
        "lisa": quality_plan.LISA_NOTE,
        "versions": runner.versions(),
        "tasks": out,
    }
    for task_name, tp in p.tasks.items():
        out[task_name] = _run_task(task_name, tp, logs, out.get(task_name))
        result["finished"] = runner.machine_load()
        if save is not None:
            save(result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", required=True, choices=methods.BY_NAME)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--jobs", required=True, help="JSON list of [lr, seed]")
    p.add_argument("--settings", default="{}", help="JSON of Settings fields")
    p.add_argument("--options", default="{}", help="JSON of the adapter's build options")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    fields: dict[str, Any] = json.loads(a.settings)
    kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    s = Settings(**kwargs)
    results, code = [], 0
    for lr, seed in json.loads(a.jobs):
        try:
            results.append(run(methods.get(a.method), a.task, lr, seed, s, json.loads(a.options)))
        except Exception as e:
            traceback.print_exc()
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            results.append(
                {"method": a.method, "task": a.task, "lr": lr, "seed": seed,
                 "error": f"{type(e).__name__}: {msg}"}
            )  # fmt: skip
            code = 1
        # Written after every job, so that a crash keeps the ones before it.
        a.out.write_text(json.dumps(results, indent=1) + "\n")
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
