"""What a finished training run leaves behind: ``report.json``, ``report.md`` and two plots.

``report.json`` holds the metrics before and after training, the run's size and time, its peak
memory, the plan stated before training (units, groups, estimated memory), for generation tasks
a few held-out prompts with the base and the fine-tuned model's answers, the full configuration
and one record per optimizer step; ``report.md`` summarises it with tables; ``loss.png`` and
``memory.png`` plot the per-step loss and peak memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..engine.optimizer import HiFTOptimizer
from ..memory.render import markdown_table, plot_lines, write_json
from .config import TrainRecipeConfig
from .safe_io import WriteError, is_write_failure, write_failure_reason

#: The files :func:`write_report` writes into the output directory.
REPORT_FILES = ("report.json", "loss.png", "memory.png", "report.md")
#: The metrics a run reports, in this order (sft's held-out answers: exact match and ROUGE-L).
REPORTED = ("accuracy", "loss", "exact_match", "rouge_l")


def format_metrics(metrics: Mapping[str, float]) -> str:
    """``accuracy 0.8580, loss 0.3412``: the metrics a run reports, on one line."""
    keys = [k for k in REPORTED if k in metrics]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys) or "n/a"


def write_report(
    out_dir: Path,
    cfg: TrainRecipeConfig,
    *,
    meta: Mapping[str, Any],
    final: Mapping[str, float],
    steps: Sequence[Mapping[str, Any]],
    hift: HiFTOptimizer | None,
    epochs: float,
    global_step: int,
    train_loss: float,
    train_seconds: float,
    total_seconds: float,
    peak_memory_mib: float,
    memory_kind: str,
    n_train: int,
    n_eval: int,
    plan: Mapping[str, Any] | None = None,
    samples: Sequence[Mapping[str, Any]] | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Writes the report files of a finished run into ``out_dir``; returns ``report.json``'s data.

    Non-finite values (a ``nan`` loss) are written as ``NaN`` / ``Infinity``, never as a number.

    Args:
        out_dir: The run's output directory.
        cfg: The run's configuration.
        meta: The run file's content, with ``zero_shot`` and ``also_eval`` metrics if measured.
        final: Metrics of the fine-tuned model on the evaluation split.
        steps: Per-step records (see :attr:`hiftune.recipes.callbacks.Progress.steps`).
        hift: The run's HiFT optimizer (``None`` for ``fpft``), for its groups and cycles.
        epochs: Epochs trained.
        global_step: Optimizer steps trained.
        train_loss: The Trainer's mean training loss.
        train_seconds: Time in ``Trainer.train``.
        total_seconds: Time of the whole run.
        peak_memory_mib: The run's peak memory.
        memory_kind: What was measured (``"CUDA allocated"`` or ``"resident set"``).
        n_train: Training examples.
        n_eval: Evaluation examples.
        plan: The plan stated before training (:meth:`hiftune.recipes.plan.Plan.to_dict`).
        samples: Held-out prompts with ``reference``, ``base`` and ``fine_tuned`` answers
            (generation tasks only).
        write: ``False`` returns the data without writing anything (the processes of a run
            under ``torchrun`` other than the main one, which writes the report).

    Raises:
        WriteError: If a report file cannot be written (the files written so far are removed).
    """
    report: dict[str, Any] = {
        "model": cfg.model,
        "task": cfg.task,
        "method": cfg.method,
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "data": cfg.data or "bundled movie-review sentiment",
        "data_splits": meta.get("data_splits"),
        "train_examples": n_train,
        "eval_split": meta.get("eval_split", cfg.eval_split),
        "eval_examples": n_eval,
        "epochs": round(float(epochs or 0), 3),
        "steps": int(global_step),
        "hift_groups": hift.num_groups if hift else None,
        "hift_cycles": hift.cycle if hift else None,
        "zero_shot": meta.get("zero_shot"),
        "final": dict(final),
        "also_eval": meta.get("also_eval"),
        "train_loss": float(train_loss),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(total_seconds, 1),
        "peak_memory_mib": round(peak_memory_mib, 1),
        "output_dir": str(out_dir),
        "plan": dict(plan) if plan is not None else None,
        "samples": [dict(s) for s in samples] if samples else None,
        "config": cfg.to_dict(),
        "per_step": [dict(s) for s in steps],
    }
    if not write:
        return report
    try:
        write_json(out_dir / "report.json", report)
        if steps:
            _plot(out_dir, cfg, steps, memory_kind)
        (out_dir / "report.md").write_text(_summary(cfg, report, hift is not None))
    except Exception as e:
        if not is_write_failure(e):
            raise
        # A partial report would pass for the run's result; none is better.
        for name in REPORT_FILES:
            (out_dir / name).unlink(missing_ok=True)
        raise WriteError(
            f"cannot write the report in {out_dir}: {write_failure_reason(e, out_dir)}; "
            "the fine-tuned model is saved there"
        ) from e
    return report


def _plot(
    out_dir: Path, cfg: TrainRecipeConfig, steps: Sequence[Mapping[str, Any]], memory_kind: str
) -> None:
    xs = [s["step"] for s in steps]
    plot_lines(
        out_dir / "loss.png",
        {"training loss": [s["loss"] for s in steps]},
        x={"training loss": xs},
        title=f"{cfg.model} {cfg.task}, {cfg.method}",
        xlabel="optimizer step",
        ylabel="loss",
    )
    plot_lines(
        out_dir / "memory.png",
        {"peak memory in step": [s["memory_mib"] for s in steps]},
        x={"peak memory in step": xs},
        title=f"Memory per step ({memory_kind})",
        xlabel="optimizer step",
        ylabel="MiB",
    )


def _summary(cfg: TrainRecipeConfig, report: Mapping[str, Any], hift: bool) -> str:
    rows = []
    for name, m in (("zero-shot", report["zero_shot"] or {}), ("fine-tuned", report["final"])):
        rows.append({"": name, **{k: m[k] for k in REPORTED if k in m}})
    cycles = f" ({report['hift_cycles']} cycles of {report['hift_groups']} groups)" if hift else ""
    lines = [
        f"# hiftune train: {cfg.model}, {cfg.task}, {cfg.method}",
        "",
        # Every metric either row has (a run without zero-shot evaluation has one row's).
        markdown_table(rows, ["", *(k for k in REPORTED if any(k in r for r in rows))]),
        f"- evaluated on {report['eval_examples']} examples of the {report['eval_split']} split; "
        f"trained on {report['train_examples']} examples for {report['epochs']} epochs = "
        f"{report['steps']} steps{cycles}",
        f"- optimizer {cfg.optimizer}, lr {cfg.lr}, batch {cfg.batch_size} x {cfg.grad_accum}, "
        f"seed {cfg.seed}",
        f"- training time {report['train_seconds']:.0f} s, total {report['total_seconds']:.0f} s, "
        f"peak memory {report['peak_memory_mib']:.0f} MiB",
    ]
    if report.get("data_splits"):
        lines.append(f"- data: {report['data_splits']}")
    lines += _plan_lines(report.get("plan"))
    lines += ["", "![loss](loss.png) ![memory](memory.png)", ""]
    lines += _sample_lines(report.get("samples"))
    return "\n".join(lines)


def _plan_lines(plan: Mapping[str, Any] | None) -> list[str]:
    """The plan's units, groups and estimated memory, as list items."""
    if not plan:
        return []
    out = []
    if plan.get("units"):
        out.append(
            f"- {len(plan['units'])} units in {len(plan['groups'])} groups of "
            f"m={plan['units_per_group']}; largest group {plan['peak_group']} "
            f"({plan['peak_group_params'] / 1e6:.1f}M parameters)"
        )
    if plan.get("units_reason"):
        out.append(f"- units per group: m={plan['units_per_group']}, {plan['units_reason']}")
    if plan.get("method") == "hift" and plan.get("budget"):
        out.append(f"- updates: {plan['budget']}")
    if plan.get("method") == "hift" and plan.get("always_active"):
        out.append(
            f"- always active: {', '.join(plan['always_active'])} "
            f"(lr x{plan['always_active_lr_scale']:g})"
        )
    out += [f"- warning: {w}" for w in plan.get("warnings") or []]
    hift, fpft = plan.get("hift"), plan.get("fpft")
    if hift and fpft:
        out.append(
            f"- estimated peak memory (batch {plan['batch_size']} x {plan['seq_len']} tokens, "
            f"{plan['optimizer']}, {plan['precision']}): HiFT {hift['total'] / 1024:.2f} GiB, "
            f"FPFT {fpft['total'] / 1024:.2f} GiB"
        )
    return out


def _sample_lines(samples: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """Held-out prompts with the reference and both models' answers, as a Markdown section."""
    if not samples:
        return []
    out = ["## Held-out prompts (greedy answers)", ""]
    for i, s in enumerate(samples, start=1):
        out += [f"**{i}.** prompt: {_quote(s.get('prompt'))}", ""]
        for label, key in (
            ("reference", "reference"),
            ("base", "base"),
            ("fine-tuned", "fine_tuned"),
        ):
            out.append(f"- {label}: {_quote(s.get(key))}")
        out.append("")
    return out


def _quote(text: Any) -> str:
    """``text`` as inline code on one line (answers may hold Markdown or newlines)."""
    if text is None:
        return "(not available)"
    one_line = " ".join(str(text).split()) or "(empty)"
    return f"`{one_line.replace('`', chr(39))}`"
