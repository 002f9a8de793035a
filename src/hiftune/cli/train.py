"""``hiftune train``: options -> :class:`~hiftune.recipes.config.TrainRecipeConfig` -> the recipe.

Argument parsing, the call into :mod:`hiftune.recipes.train`, and printing its outcome; the
recipe itself, its configuration and its checks live in :mod:`hiftune.recipes`.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from collections.abc import Iterator, Mapping
from types import FrameType
from typing import Any

from ..engine.config import GROUP_BY, OFFLOADS, ORDERS, PRECISIONS
from ..engine.optimizers import METHODS, OPTIMIZERS
from ..recipes.config import (
    EVAL_SPLITS,
    SCHEDULERS,
    TrainRecipeConfig,
    build_config,
)
from ..recipes.models import DTYPES, PRESETS, TASKS
from ..recipes.report import format_metrics
from .options import add_hub_arguments, add_schedule_arguments
from .training_args import (
    add_training_arguments,
    could_be_training_option,
    describe_training_arguments,
)
from .types import positive_float, unit_budget

#: Exit code of a run stopped by Ctrl-C after saving a checkpoint (128 + SIGINT); SIGTERM gives
#: 143 and SIGHUP 129, the codes a scheduler expects of a job its signal ended.
INTERRUPTED = 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``hiftune train`` options (all optional; defaults are the bundled recipe)."""
    # Every flag defaults to argparse.SUPPRESS: unset flags stay absent from the namespace, so a
    # config file's values are not overridden by defaults.
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    # The generated usage would list all ~200 options; the sections below describe them.
    parser.usage = "hiftune train [--model MODEL] [--data DATA ...] [--task TASK] [options]"
    _add_model_data_arguments(parser)
    _add_training_arguments(parser)
    describe_training_arguments(parser)


#: The TrainingArguments options: added to the parser only for a command line that may use one.
add_extra_arguments = add_training_arguments
is_extra_option = could_be_training_option


def _add_model_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say which model, which data and which task."""
    S = argparse.SUPPRESS
    d = TrainRecipeConfig()
    g = parser.add_argument_group("model")
    presets = ", ".join(f"{k} ({v.description})" for k, v in PRESETS.items())
    g.add_argument(
        "--model",
        default=S,
        help=f"preset [{presets}], a local HF model directory, or a Hugging Face Hub id "
        f"(from the cache under HF_HOME; downloaded unless HF_HUB_OFFLINE=1) (default {d.model})",
    )
    add_hub_arguments(g, defaults=False)
    g.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=S,
        help=f"precision of the loaded weights; auto: the checkpoint's (default {d.dtype})",
    )
    g = parser.add_argument_group("data and task")
    g.add_argument(
        "--task",
        choices=TASKS,
        default=S,
        help="prompt-cls: label word after a prompt; seq-cls: classification head; sft: chat "
        "messages or ShareGPT conversations (loss on the assistant turns), Alpaca "
        "instruction/input/output or prompt/completion pairs (loss on the answer) or plain text "
        "(loss on all tokens), detected from the fields "
        f"(default {d.task})",
    )
    g.add_argument(
        "--data",
        nargs="+",
        default=S,
        help="JSONL/JSON/CSV/TSV/Parquet/TXT files (or a quoted glob), a save_to_disk or data "
        "directory, or a Hub dataset id (default: the bundled movie-review sentiment data)",
    )
    g.add_argument("--data-config", default=S, help="the Hub dataset's configuration name")
    g.add_argument("--data-split", default=S, help=f"split to train on (default {d.data_split})")
    g.add_argument(
        "--text-field", default=S, help=f"classification, sft plain text (default {d.text_field})"
    )
    g.add_argument("--label-field", default=S, help=f"(default {d.label_field})")
    g.add_argument("--messages-field", default=S, help=f"sft (default {d.messages_field})")
    g.add_argument("--prompt-field", default=S, help=f"sft (default {d.prompt_field})")
    g.add_argument(
        "--completion-field",
        default=S,
        help=f"sft (default {d.completion_field}; else --response-field)",
    )
    g.add_argument("--response-field", default=S, help=f"sft (default {d.response_field})")
    g.add_argument(
        "--system-prompt",
        default=S,
        help="sft: the system message of every conversation, replacing the data's ('' for an "
        "empty one, which keeps a template's default system prompt out)",
    )
    g.add_argument(
        "--chat-template",
        default=S,
        help="sft: a chat template file or Jinja string to use instead of the tokenizer's "
        "(saved with the fine-tuned model)",
    )
    g.add_argument(
        "--template", default=S, help=f"prompt-cls prompt with {{text}} (default {d.template!r})"
    )
    g.add_argument(
        "--label-words",
        default=S,
        help="prompt-cls: comma-separated, one per class in sorted label order (default terrible,great)",
    )
    g.add_argument(
        "--max-length", type=int, default=S, help=f"tokens per example (default {d.max_length})"
    )
    g.add_argument(
        "--train-samples",
        default=S,
        help="seeded subset of the training split, or 'all' (default: all of your data; "
        "1600 of the bundled demo)",
    )
    g.add_argument(
        "--eval-samples",
        default=S,
        help="first N of the evaluation split, or 'all' (default: all of your data; 500 of the "
        "bundled demo)",
    )
    g.add_argument(
        "--eval-split",
        default=S,
        help="split to evaluate on (default: the data's validation or test split, else a "
        f"held-out part of the training split; the bundled data has {', '.join(EVAL_SPLITS)}: "
        "test)",
    )
    g.add_argument(
        "--eval-fraction",
        type=float,
        default=S,
        help="share of the training split held out for evaluation when the data has no "
        f"evaluation split (seeded) (default {d.eval_fraction})",
    )
    g.add_argument(
        "--also-eval",
        default=S,
        help="evaluate the fine-tuned model on this split too (e.g. validation for a search)",
    )


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of training, HiFT and the output."""
    S = argparse.SUPPRESS
    d = TrainRecipeConfig()
    g = parser.add_argument_group("training")
    g.add_argument(
        "--method",
        choices=METHODS,
        default=S,
        help=f"hift, or fpft = plain full fine-tuning, same loop (default {d.method})",
    )
    optimizers = "; ".join(f"{k}: {v.help}" for k, v in OPTIMIZERS.items())
    g.add_argument(
        "--optimizer",
        choices=tuple(OPTIMIZERS),
        default=S,
        help=f"{optimizers} (default {d.optimizer})",
    )
    g.add_argument("--lr", type=float, default=S, help=f"(default {d.lr})")
    g.add_argument("--epochs", type=float, default=S, help=f"(default {d.epochs})")
    g.add_argument("--max-steps", type=int, default=S, help="optimizer steps; overrides --epochs")
    g.add_argument("--batch-size", type=int, default=S, help=f"(default {d.batch_size})")
    g.add_argument(
        "--grad-accum", type=int, default=S, help=f"micro-batches per step (default {d.grad_accum})"
    )
    g.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        default=S,
        help=f"(default {d.scheduler}; HiFT counts it in cycles)",
    )
    g.add_argument("--warmup-ratio", type=float, default=S, help=f"(default {d.warmup_ratio})")
    g.add_argument("--weight-decay", type=float, default=S, help=f"(default {d.weight_decay})")
    g.add_argument(
        "--max-grad-norm",
        type=float,
        default=S,
        help=f"0 = no clipping (default {d.max_grad_norm})",
    )
    g.add_argument("--seed", type=int, default=S, help=f"(default {d.seed})")
    g = parser.add_argument_group("HiFT")
    add_schedule_arguments(g, defaults=False)
    g.add_argument(
        "--always-active-lr-scale",
        type=positive_float,
        default=S,
        help=f"factor on their learning rate (default {d.always_active_lr_scale:g})",
    )
    g.add_argument(
        "--max-unit-params",
        type=unit_budget,
        default=S,
        help="unit size budget in parameters: larger units are split (a block into its modules, "
        "a vocabulary matrix into row shards); auto = the largest block, none = the paper's "
        f"units (default {d.max_unit_params})",
    )
    g.add_argument(
        "--group-by",
        choices=GROUP_BY,
        default=S,
        help=f"count: m units per group; size: as many groups, balanced (default {d.group_by})",
    )
    g.add_argument("--order", choices=ORDERS, default=S, help=f"(default {d.order})")
    g.add_argument(
        "--offload",
        choices=OFFLOADS,
        default=S,
        help=f"inactive optimizer state (default {d.offload})",
    )
    g.add_argument("--precision", choices=PRECISIONS, default=S, help=f"(default {d.precision})")
    g.add_argument(
        "--shard-state",
        action="store_true",
        default=S,
        help="under torchrun / accelerate launch: each rank keeps only its share of the groups' "
        "paged optimizer state (fp32 only)",
    )
    g = parser.add_argument_group("output")
    g.add_argument("--output-dir", default=S, help="default runs/<model>-<task>-<method>")
    g.add_argument("--save-steps", type=int, default=S, help="also checkpoint every N steps")
    g.add_argument(
        "--overwrite-output-dir",
        action="store_true",
        default=S,
        help="start afresh in an --output-dir that holds another run (removes its checkpoints)",
    )
    g.add_argument(
        "--resume",
        default=S,
        help="checkpoint directory (or an output directory: its latest checkpoint)",
    )
    g.add_argument("--eval-batch-size", type=int, default=S, help=f"(default {d.eval_batch_size})")
    g.add_argument(
        "--no-zero-shot",
        dest="zero_shot",
        action="store_false",
        default=S,
        help="skip the evaluation before training",
    )
    parser.add_argument(
        "--config",
        default=S,
        help="YAML or JSON file with any of the options (flags given here win over it)",
    )


def config_from_args(args: argparse.Namespace) -> TrainRecipeConfig:
    """Defaults, then the checkpoint of ``--resume``, then the ``--config`` file, then flags.

    Raises:
        UserError: For an unreadable config file or checkpoint, an unknown key or a bad value.
    """
    # Everything the parser holds but the top level's own: explicitly typed values only.
    values = {
        k: v
        for k, v in vars(args).items()
        if k not in ("command", "verbose") and v is not argparse.SUPPRESS
    }
    return build_config(values)


def run(args: argparse.Namespace) -> int:
    """Runs ``hiftune train``; returns the exit code.

    0 when the run finished; 128 + the signal's number when a signal stopped it after saving a
    checkpoint (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP).
    """
    cfg = config_from_args(args)
    # Imported here: transformers' Trainer takes seconds to import, and `hiftune train --help`
    # or a bad option should not wait for it.
    from ..recipes.train import Recipe

    with _stop_signals_abort():
        result = Recipe(
            cfg, verbose=bool(getattr(args, "verbose", False)), on_plan=_print_plan
        ).run()
    if result.report is None:
        if result.main_process:  # under torchrun, one process speaks for the run
            print(
                f"interrupted at step {result.steps}; checkpoint saved to {result.checkpoint}\n"
                f"resume with: {result.resume_command}"
            )
        return 128 + result.signum if result.signum else INTERRUPTED
    if result.main_process:
        _print_summary(result.report)
    return 0


@contextlib.contextmanager
def _stop_signals_abort() -> Iterator[None]:
    """SIGTERM and SIGHUP abort like Ctrl-C outside training (during it, the recipe checkpoints).

    Their default action ends the process at once, without the clean-up that an exception runs
    on its way out (temporary optimizer-state files, the output directory's lock file).
    """

    def abort(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # signals go to the main one
        yield
        return
    previous = {s: signal.signal(s, abort) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _print_plan(plan: Any) -> None:
    # Flushed: the progress bar that follows writes to stderr.
    print(plan.format(), flush=True)


def _print_summary(report: Mapping[str, Any]) -> None:
    print(f"zero-shot:  {format_metrics(report.get('zero_shot') or {})}")
    print(f"fine-tuned: {format_metrics(report['final'])}")
    for split, metrics in (report.get("also_eval") or {}).items():
        print(f"fine-tuned on {split}: {format_metrics(metrics)}")
    print(
        f"{report['steps']} steps in {report['train_seconds']:.0f} s, peak memory "
        f"{report['peak_memory_mib']:.0f} MiB; model and report in {report['output_dir']} "
        "(report.md, report.json, loss.png, memory.png)"
    )
    for i, sample in enumerate(report.get("samples") or [], start=1):
        print(f"held-out prompt {i}: {_one_line(sample.get('prompt'))}")
        print(f"  base:       {_one_line(sample.get('base'))}")
        print(f"  fine-tuned: {_one_line(sample.get('fine_tuned'))}")


def _one_line(text: Any, limit: int = 100) -> str:
    if text is None:
        return "(not available)"
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
