"""``hiftune train``: fine-tune a model end to end with HiFT (or plain full fine-tuning as baseline).

A thin layer over ``transformers.Trainer``: ``--method hift`` uses
:class:`hiftune.integrations.transformers.HiFTTrainer`, ``--method fpft`` the plain ``Trainer``
with the very same arguments, so both run the same loop. This module only adds what a recipe
needs around it: data and model loading, the prompt-classification loss and accuracy, a progress
bar, a per-step log, the report, resumable interrupts and checks that turn bad input into one
line.

With no arguments it fine-tunes SmolLM2-135M-Instruct on the bundled movie-review sentiment task
as prompt-based classification (``<sentence> It was great`` / ``... terrible``), evaluating
before and after, and saves the model and a report under ``runs/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The Hub is often unreachable (and never needed: models are local); fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ..errors import UserError, first_line
from ..engine.config import OFFLOADS, ORDERS, PRECISIONS
from . import data as D
from .models import DEFAULT_MODEL, PRESETS, TASKS, ModelError

logger = logging.getLogger(__name__)

METHODS = ("hift", "fpft")
OPTIMIZERS = ("adamw", "sgd", "sgdm", "adagrad", "adafactor")
SCHEDULERS = ("linear", "constant", "cosine")
EVAL_SPLITS = ("test", "validation")
#: Written to the output directory and into every checkpoint; ``--resume`` compares it.
RUN_CONFIG = "hiftune_run.json"
#: Keys that may differ when resuming (they do not change what the checkpoint means).
RESUMABLE_CHANGES = frozenset(
    {"epochs", "max_steps", "output_dir", "resume", "save_steps", "eval_batch_size", "offload"}
    | {"eval_split", "also_eval", "eval_samples", "zero_shot", "config"}
)


@dataclass
class TrainRecipeConfig:
    """Everything ``hiftune train`` does, as one validated record (also the config-file schema).

    A YAML or JSON file given with ``--config`` holds the same keys; flags on the command line
    override it. Invalid values raise ``ValueError`` naming the field.
    """

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "preset or HF model directory"})
    task: str = field(default="prompt-cls", metadata={"help": f"one of {TASKS}"})
    data: str | None = field(default=None, metadata={"help": "JSONL/CSV file (default: bundled)"})
    text_field: str = "text"
    label_field: str = "label"
    prompt_field: str = "prompt"
    response_field: str = "response"
    template: str = D.DEFAULT_TEMPLATE
    label_words: list[str] | None = None
    method: str = "hift"
    optimizer: str = "adamw"
    lr: float = 1e-4
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    units_per_group: int = 4
    order: str = "bottom2up"
    offload: str = "host"
    precision: str = "fp32"
    scheduler: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 128
    train_samples: int | None = 1600
    eval_samples: int | None = 500
    eval_split: str = "test"
    also_eval: str | None = None
    eval_batch_size: int = 32
    zero_shot: bool = True
    save_steps: int | None = None
    output_dir: str | None = None
    resume: str | None = None
    seed: int = 0
    config: str | None = field(default=None, metadata={"help": "the config file it came from"})

    def __post_init__(self) -> None:
        for name, allowed in (
            ("task", TASKS),
            ("method", METHODS),
            ("optimizer", OPTIMIZERS),
            ("order", ORDERS),
            ("offload", OFFLOADS),
            ("precision", PRECISIONS),
            ("scheduler", SCHEDULERS),
            ("eval_split", EVAL_SPLITS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}"
                )
        if self.also_eval is not None and (
            self.also_eval not in EVAL_SPLITS or self.also_eval == self.eval_split
        ):
            raise ValueError(
                f"also_eval must be the other split than eval_split={self.eval_split!r} "
                f"(one of {', '.join(EVAL_SPLITS)}), got {self.also_eval!r}"
            )
        for name in (
            "batch_size",
            "grad_accum",
            "units_per_group",
            "max_length",
            "eval_batch_size",
        ):
            _check_int(name, getattr(self, name), 1)
        for name in ("max_steps", "train_samples", "eval_samples", "save_steps"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        _check_int("seed", self.seed, 0)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise ValueError(f"epochs must be > 0, got {self.epochs!r}")
        if not (isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio < 1):
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm >= 0):
            raise ValueError(
                f"max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm!r}"
            )
        if "{text}" not in self.template:
            raise ValueError(f"template must contain {{text}}, got {self.template!r}")
        if isinstance(self.label_words, str):
            self.label_words = [w.strip() for w in self.label_words.split(",")]
        if self.label_words is not None and (
            len(self.label_words) < 2 or not all(isinstance(w, str) and w for w in self.label_words)
        ):
            raise ValueError(f"label_words must be two or more words, got {self.label_words!r}")
        if self.method == "fpft" and self.precision == "fp16":
            raise ValueError(
                "precision=fp16 is HiFT's mixed precision; for --method fpft use fp32 or bf16"
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON values."""
        return dataclasses.asdict(self)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# --- command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``hiftune train`` options (all optional; defaults are the bundled recipe)."""
    S = argparse.SUPPRESS  # unset flags stay absent, so a config file's values are not overridden
    d = TrainRecipeConfig()
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    g = parser.add_argument_group("model and data")
    presets = ", ".join(f"{k} ({v.description})" for k, v in PRESETS.items())
    g.add_argument(
        "--model",
        default=S,
        help=f"preset [{presets}] or a local HF model directory (default {d.model})",
    )
    g.add_argument(
        "--task",
        choices=TASKS,
        default=S,
        help=f"prompt-cls: label word after a prompt; seq-cls: classification head; sft: prompt/response pairs, loss on the response (default {d.task})",
    )
    g.add_argument(
        "--data",
        default=S,
        help="JSONL or CSV file (default: the bundled movie-review sentiment data)",
    )
    g.add_argument("--text-field", default=S, help=f"(default {d.text_field})")
    g.add_argument("--label-field", default=S, help=f"(default {d.label_field})")
    g.add_argument("--prompt-field", default=S, help=f"sft (default {d.prompt_field})")
    g.add_argument("--response-field", default=S, help=f"sft (default {d.response_field})")
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
        type=_int_or_none,
        default=S,
        help=f"seeded subset of the training split; 'all' for everything (default {d.train_samples})",
    )
    g.add_argument(
        "--eval-samples",
        type=_int_or_none,
        default=S,
        help=f"first N of the evaluation split; 'all' (default {d.eval_samples})",
    )
    g.add_argument("--eval-split", choices=EVAL_SPLITS, default=S, help=f"(default {d.eval_split})")
    g.add_argument(
        "--also-eval",
        choices=EVAL_SPLITS,
        default=S,
        help="evaluate the fine-tuned model on this split too (e.g. validation for a search)",
    )
    g = parser.add_argument_group("training")
    g.add_argument(
        "--method",
        choices=METHODS,
        default=S,
        help=f"hift, or fpft = plain full fine-tuning, same loop (default {d.method})",
    )
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=S, help=f"(default {d.optimizer})")
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
    g.add_argument(
        "--units-per-group", type=int, default=S, help=f"m (default {d.units_per_group})"
    )
    g.add_argument("--order", choices=ORDERS, default=S, help=f"(default {d.order})")
    g.add_argument(
        "--offload",
        choices=OFFLOADS,
        default=S,
        help=f"inactive optimizer state (default {d.offload})",
    )
    g.add_argument("--precision", choices=PRECISIONS, default=S, help=f"(default {d.precision})")
    g = parser.add_argument_group("output")
    g.add_argument("--output-dir", default=S, help="default runs/<model>-<task>-<method>")
    g.add_argument("--save-steps", type=int, default=S, help="also checkpoint every N steps")
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
    parser.add_argument("--config", default=S, help="YAML or JSON file with any of the keys above")


def _int_or_none(value: str) -> int | None:
    if value.lower() in ("all", "none"):
        return None
    return int(value)


def config_from_args(args: argparse.Namespace) -> TrainRecipeConfig:
    """Defaults, then the ``--config`` file, then explicit flags.

    Raises:
        UserError: For an unreadable config file, an unknown key or an invalid value.
    """
    values: dict[str, Any] = {}
    resume = getattr(args, "resume", None)
    if resume is not None:
        # Resuming continues the saved run: its config is the base, flags may only extend it
        # (more epochs or steps, say); anything else that differs is rejected later.
        saved = _saved_run(find_checkpoint(resume))
        values.update(
            {k: v for k, v in saved.get("config", {}).items() if k not in ("resume", "config")}
        )
    path = getattr(args, "config", None)
    if path is not None:
        values.update(_read_config_file(Path(path)))
        values["config"] = str(path)
    names = {f.name for f in dataclasses.fields(TrainRecipeConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    try:
        return TrainRecipeConfig(**values)
    except ValueError as e:
        raise UserError(str(e)) from e


def find_checkpoint(resume: str) -> Path:
    """The checkpoint ``--resume`` means: the directory itself, or its latest ``checkpoint-N``.

    Raises:
        UserError: If there is no such directory or it holds no Trainer checkpoint.
    """
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise UserError(f"--resume {path} is not a directory")
    if (path / "trainer_state.json").is_file():
        return path
    found = sorted(
        (p for p in path.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
        key=lambda p: int(re.sub(r"\D", "", p.name) or 0),
    )
    if not found:
        raise UserError(f"--resume {path} holds no checkpoint (no trainer_state.json)")
    return found[-1]


def _saved_run(checkpoint: Path) -> dict[str, Any]:
    """The run file of ``checkpoint`` (or of its output directory).

    Raises:
        UserError: If there is none (not a ``hiftune train`` checkpoint) or it is corrupt.
    """
    for candidate in (checkpoint / RUN_CONFIG, checkpoint.parent / RUN_CONFIG):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{candidate} is corrupt: {e.msg}") from e
    raise UserError(f"--resume {checkpoint} was not written by hiftune train (no {RUN_CONFIG})")


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as e:  # any parse error is the user's file
        raise UserError(f"cannot parse config file {path}: {first_line(e)}") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value")
    names = {f.name for f in dataclasses.fields(TrainRecipeConfig)} - {"config"}
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise UserError(f"unknown key {key!r} in {path}; allowed: {', '.join(sorted(names))}")
        out[name] = value
    return out


# --- the recipe --------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Runs ``hiftune train``; returns the exit code (0 done, 130 interrupted and checkpointed)."""
    cfg = config_from_args(args)
    try:
        return Recipe(cfg, verbose=bool(getattr(args, "verbose", False))).run()
    except (D.DataError, ModelError) as e:
        raise UserError(str(e)) from e


class Recipe:
    """One ``hiftune train`` run; :meth:`run` does everything.

    Args:
        cfg: The validated configuration.
        verbose: Keep ``transformers``' own info logging and progress bars.
    """

    def __init__(self, cfg: TrainRecipeConfig, verbose: bool = False) -> None:
        self.cfg = cfg
        self.verbose = verbose

    # The steps of run(), in order.

    def run(self) -> int:
        """Loads, evaluates zero-shot, trains, evaluates, saves and reports."""
        cfg = self.cfg
        t_start = time.perf_counter()
        checkpoint = find_checkpoint(cfg.resume) if cfg.resume else None
        out_dir = Path(
            cfg.output_dir
            or (checkpoint.parent if checkpoint else Path("runs") / self._default_name())
        )
        self._quiet_transformers()
        import transformers

        from .models import load_model_and_tokenizer, resolve_model

        model_dir, preset = resolve_model(cfg.model)
        if preset is not None and cfg.task not in preset.tasks:
            raise ModelError(
                f"{preset.name} ({preset.description}) cannot do --task {cfg.task}; "
                f"it does {', '.join(preset.tasks)}"
            )
        splits, classes = self._load_data()
        transformers.set_seed(cfg.seed)  # seeds a new classification head, too
        model, tokenizer = load_model_and_tokenizer(
            model_dir, cfg.task, num_labels=len(classes or [0, 1]), name=cfg.model
        )
        identity = self._identity(model_dir, classes)
        saved = self._check_resume(checkpoint, identity) if checkpoint is not None else None
        task = self._build_task(model, tokenizer, classes)
        train_ds = task.encode(splits["train"])
        eval_ds = task.encode_eval(splits["eval"])

        out_dir.mkdir(parents=True, exist_ok=True)
        meta = {"config": cfg.to_dict(), "identity": identity}
        run_file = out_dir / RUN_CONFIG
        if saved is not None:
            meta["zero_shot"] = saved.get("zero_shot")
        trainer, progress = self._build_trainer(
            model, tokenizer, task, train_ds, eval_ds, out_dir, meta
        )

        if checkpoint is None and cfg.zero_shot:
            logger.info("zero-shot evaluation on %d %s examples", len(eval_ds), cfg.eval_split)
            meta["zero_shot"] = self._evaluate(trainer, "zero-shot")
        run_file.write_text(json.dumps(meta, indent=2) + "\n")

        t_train = time.perf_counter()
        interrupted = _Interrupt()
        progress.interrupt = interrupted
        with interrupted:
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        train_seconds = time.perf_counter() - t_train
        progress.close()
        if interrupted.requested:
            last = out_dir / f"checkpoint-{trainer.state.global_step}"
            print(
                f"interrupted at step {trainer.state.global_step}; checkpoint saved to {last}\n"
                f"resume with: hiftune train --resume {last}"
            )
            self._close(trainer)
            return 130

        final = self._evaluate(trainer, "fine-tuned")
        if cfg.also_eval:
            extra = task.encode_eval(splits["also"])
            meta["also_eval"] = {
                cfg.also_eval: self._evaluate(trainer, cfg.also_eval, _ListDataset(extra))
            }
        trainer.save_model(str(out_dir))  # with the tokenizer (the Trainer's processing_class)
        self._close(trainer)
        report = self._write_report(
            out_dir,
            meta,
            final,
            trainer,
            progress,
            result,
            train_seconds,
            time.perf_counter() - t_start,
            len(train_ds),
            len(eval_ds),
        )
        self._print_summary(meta.get("zero_shot"), final, report)
        return 0

    def _default_name(self) -> str:
        model = self.cfg.model if self.cfg.model in PRESETS else Path(self.cfg.model).name
        return f"{model}-{self.cfg.task}-{self.cfg.method}"

    def _quiet_transformers(self) -> None:
        if self.verbose:
            return
        import transformers

        # Their per-load reports and bars would bury our one progress bar; errors still show.
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()

    def _load_data(self) -> tuple[dict[str, list[dict[str, Any]]], list[str] | None]:
        cfg = self.cfg
        if cfg.data is None:
            splits = D.sentiment_splits()
            if cfg.task == "sft":
                splits = {k: D.as_sft(v) for k, v in splits.items()}
                classes = None
            else:
                classes = ["negative", "positive"]
        else:
            records = D.read_records(cfg.data)
            if cfg.task == "sft":
                fields = {"prompt": cfg.prompt_field, "response": cfg.response_field}
            else:
                fields = {"text": cfg.text_field, "label": cfg.label_field}
            records = D.select_fields(records, fields, cfg.data)
            classes = None
            if cfg.task != "sft":
                records, classes = D.encode_labels(records)
            splits = D.holdout_splits(records)
        train = D.subsample(splits["train"], cfg.train_samples, cfg.seed)
        evaluation = splits[cfg.eval_split]
        if cfg.eval_samples is not None:
            evaluation = evaluation[: cfg.eval_samples]
        if not train or not evaluation:
            raise D.DataError("the data leaves no training or evaluation examples")
        out = {"train": train, "eval": evaluation}
        if cfg.also_eval:
            out["also"] = splits[cfg.also_eval][: cfg.eval_samples]
        return out, classes

    def _identity(self, model_dir: Path, classes: list[str] | None) -> dict[str, Any]:
        """What a checkpoint must share with this run to be resumed by it."""
        cfg = self.cfg
        return {
            "model": cfg.model if cfg.model in PRESETS else str(Path(cfg.model).resolve()),
            "model_dir": str(model_dir),
            "data": None if cfg.data is None else str(Path(cfg.data).resolve()),
            "classes": classes,
        }

    def _check_resume(self, checkpoint: Path, identity: Mapping[str, Any]) -> dict[str, Any]:
        """Refuses a checkpoint of another run; returns its saved run file."""
        saved = _saved_run(checkpoint)
        resolved = {k: v for k, v in identity.items() if k != "model_dir"}
        theirs = {
            **saved.get("config", {}),
            **{k: v for k, v in saved.get("identity", {}).items() if k != "model_dir"},
        }
        ours = {**self.cfg.to_dict(), **resolved}
        for key, value in theirs.items():
            if key not in RESUMABLE_CHANGES and ours.get(key) != value:
                raise UserError(
                    f"--resume {checkpoint} is from a different run: it has {key}={value!r}, "
                    f"this run has {key}={ours.get(key)!r}"
                )
        return saved

    def _build_task(self, model: Any, tokenizer: Any, classes: list[str] | None) -> _Task:
        cfg = self.cfg
        if cfg.task == "prompt-cls":
            words = cfg.label_words
            if words is None:
                if len(classes or []) != len(D.DEFAULT_LABEL_WORDS):
                    raise D.DataError(
                        f"the data has {len(classes or [])} classes {classes}; give one "
                        "--label-words word per class"
                    )
                words = list(D.DEFAULT_LABEL_WORDS)
            if len(words) != len(classes or []):
                raise D.DataError(
                    f"{len(words)} label words {words} for {len(classes or [])} classes {classes}"
                )
            fmt = D.PromptFormat(cfg.template, tuple(words))
            return _PromptClsTask(model, tokenizer, fmt, cfg.max_length)
        if cfg.task == "seq-cls":
            return _SeqClsTask(tokenizer, cfg.max_length)
        return _SftTask(tokenizer, cfg.max_length)

    def _build_trainer(
        self,
        model: Any,
        tokenizer: Any,
        task: _Task,
        train_ds: list[dict[str, Any]],
        eval_ds: list[dict[str, Any]],
        out_dir: Path,
        meta: dict[str, Any],
    ) -> tuple[Any, _Progress]:
        import transformers
        from transformers import Trainer, TrainingArguments

        cfg = self.cfg
        autocast_bf16 = cfg.method == "fpft" and cfg.precision == "bf16"
        try:
            args = self._training_arguments(TrainingArguments, out_dir, autocast_bf16)
        except ValueError as e:  # e.g. a precision this machine does not support
            raise UserError(f"invalid training arguments: {first_line(e)}") from e
        common: dict[str, Any] = dict(
            model=model,
            args=args,
            train_dataset=_ListDataset(train_ds),
            eval_dataset=_ListDataset(eval_ds),
            data_collator=task.collator(),
            compute_metrics=task.compute_metrics,
            compute_loss_func=task.compute_loss,
            preprocess_logits_for_metrics=task.preprocess_logits,
            optimizer_cls_and_kwargs=_optimizer(cfg),
            processing_class=tokenizer,
        )
        if cfg.method == "hift":
            from ..engine.config import HiFTConfig
            from ..integrations.transformers import HiFTTrainer

            hift = HiFTConfig(
                units_per_group=cfg.units_per_group,
                order=cfg.order,  # type: ignore[arg-type]
                seed=cfg.seed,
                offload=cfg.offload,  # type: ignore[arg-type]
                precision=cfg.precision,  # type: ignore[arg-type]
            )
            trainer = HiFTTrainer(hift_config=hift, **common)
        else:
            trainer = Trainer(**common)
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        progress = _make_progress(meta)
        trainer.add_callback(progress)
        return trainer, progress

    def _training_arguments(self, cls: Any, out_dir: Path, autocast_bf16: bool) -> Any:
        import torch

        cfg = self.cfg
        return cls(
            output_dir=str(out_dir),
            per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.eval_batch_size,
            gradient_accumulation_steps=cfg.grad_accum,
            learning_rate=cfg.lr,
            num_train_epochs=cfg.epochs,
            max_steps=cfg.max_steps or -1,
            lr_scheduler_type=cfg.scheduler,
            warmup_steps=cfg.warmup_ratio,
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
            logging_steps=1,
            save_strategy="steps" if cfg.save_steps else "no",
            save_steps=cfg.save_steps or 500,
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,  # our own bar shows loss, group and memory
            seed=cfg.seed,
            data_seed=cfg.seed,
            remove_unused_columns=False,  # the collator already builds exactly the model inputs
            dataloader_num_workers=0,
            dataloader_pin_memory=torch.cuda.is_available(),
            # FPFT's bf16 is the Trainer's autocast; HiFT's mixed precision lives in its optimizer.
            bf16=autocast_bf16,
            # bf16 autocast without CUDA: the Trainer must be told that it runs on the CPU.
            use_cpu=autocast_bf16 and not torch.cuda.is_available(),
            label_names=["labels"],
            # sft has no metric beyond the loss: keep no [batch, length, vocab] logits around.
            prediction_loss_only=cfg.task == "sft",
        )

    def _evaluate(self, trainer: Any, what: str, dataset: Any = None) -> dict[str, float]:
        metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix="eval")
        out = {k.removeprefix("eval_"): v for k, v in metrics.items()}
        logger.info("%s: %s", what, _fmt_metrics(out))
        return out

    def _close(self, trainer: Any) -> None:
        from ..integrations.transformers import unwrap_hift

        hift = unwrap_hift(trainer.optimizer)
        if hift is not None:
            hift.close()

    def _write_report(
        self,
        out_dir: Path,
        meta: Mapping[str, Any],
        final: Mapping[str, float],
        trainer: Any,
        progress: _Progress,
        result: Any,
        train_seconds: float,
        total_seconds: float,
        n_train: int,
        n_eval: int,
    ) -> dict[str, Any]:
        from ..integrations.transformers import unwrap_hift
        from ..memory.measure import peak_memory_mib
        from ..memory.report import markdown_table, plot_lines, write_json

        cfg = self.cfg
        hift = unwrap_hift(trainer.optimizer)
        steps = progress.steps
        report: dict[str, Any] = {
            "model": cfg.model,
            "task": cfg.task,
            "method": cfg.method,
            "optimizer": cfg.optimizer,
            "lr": cfg.lr,
            "data": cfg.data or "bundled movie-review sentiment",
            "train_examples": n_train,
            "eval_split": cfg.eval_split,
            "eval_examples": n_eval,
            "epochs": round(float(trainer.state.epoch or 0), 3),
            "steps": int(trainer.state.global_step),
            "hift_groups": hift.num_groups if hift else None,
            "hift_cycles": hift.cycle if hift else None,
            "zero_shot": meta.get("zero_shot"),
            "final": dict(final),
            "also_eval": meta.get("also_eval"),
            "train_loss": float(getattr(result, "training_loss", float("nan"))),
            "train_seconds": round(train_seconds, 1),
            "total_seconds": round(total_seconds, 1),
            "peak_memory_mib": round(peak_memory_mib(trainer.args.device), 1),
            "output_dir": str(out_dir),
            "config": cfg.to_dict(),
            "per_step": steps,
        }
        write_json(out_dir / "report.json", report)
        xs = [s["step"] for s in steps]
        if steps:
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
                title=f"Memory per step ({'CUDA allocated' if trainer.args.device.type == 'cuda' else 'resident set'})",
                xlabel="optimizer step",
                ylabel="MiB",
            )
        rows = []
        for name, m in (("zero-shot", meta.get("zero_shot") or {}), ("fine-tuned", final)):
            rows.append({"": name, **{k: m[k] for k in ("accuracy", "loss") if k in m}})
        summary = [
            f"# hiftune train: {cfg.model}, {cfg.task}, {cfg.method}",
            "",
            markdown_table(rows),
            f"- evaluated on {n_eval} examples of the {cfg.eval_split} split; trained on "
            f"{n_train} examples for {report['epochs']} epochs = {report['steps']} steps"
            + (
                f" ({report['hift_cycles']} cycles of {report['hift_groups']} groups)"
                if hift
                else ""
            ),
            f"- optimizer {cfg.optimizer}, lr {cfg.lr}, batch {cfg.batch_size} x {cfg.grad_accum}, "
            f"seed {cfg.seed}",
            f"- training time {train_seconds:.0f} s, total {total_seconds:.0f} s, "
            f"peak memory {report['peak_memory_mib']:.0f} MiB",
            "",
            "![loss](loss.png) ![memory](memory.png)",
            "",
        ]
        (out_dir / "report.md").write_text("\n".join(summary))
        return report

    def _print_summary(
        self,
        zero: Mapping[str, float] | None,
        final: Mapping[str, float],
        report: Mapping[str, Any],
    ) -> None:
        print(f"zero-shot:  {_fmt_metrics(zero or {})}")
        print(f"fine-tuned: {_fmt_metrics(final)}")
        for split, metrics in (report.get("also_eval") or {}).items():
            print(f"fine-tuned on {split}: {_fmt_metrics(metrics)}")
        print(
            f"{report['steps']} steps in {report['train_seconds']:.0f} s, peak memory "
            f"{report['peak_memory_mib']:.0f} MiB; model and report in {report['output_dir']} "
            "(report.md, report.json, loss.png, memory.png)"
        )


def _fmt_metrics(m: Mapping[str, float]) -> str:
    keys = [k for k in ("accuracy", "loss") if k in m]
    return ", ".join(f"{k} {m[k]:.4f}" for k in keys) or "n/a"


def _optimizer(cfg: TrainRecipeConfig) -> tuple[Any, dict[str, Any]]:
    """``--optimizer`` as the ``(class, kwargs)`` pair of ``Trainer(optimizer_cls_and_kwargs=)``."""
    import torch

    if cfg.optimizer == "adamw":
        return torch.optim.AdamW, {"lr": cfg.lr}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD, {"lr": cfg.lr}
    if cfg.optimizer == "sgdm":
        return torch.optim.SGD, {"lr": cfg.lr, "momentum": 0.9}
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad, {"lr": cfg.lr}
    from transformers.optimization import Adafactor

    # A fixed learning rate under our scheduler, as for the other optimizers.
    return Adafactor, {
        "lr": cfg.lr,
        "scale_parameter": False,
        "relative_step": False,
        "warmup_init": False,
    }


# --- tasks: how examples become tensors, losses and metrics ------------------------------------


class _Task:
    """Per-task encoding, collation, loss and metrics (what the Trainer is parametrised with)."""

    compute_loss: Any = None
    preprocess_logits: Any = None

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def encode(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def encode_eval(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """:meth:`encode`, sorted by length: the order does not change the metrics, and sorted
        batches need the least padding."""
        return sorted(self.encode(records), key=lambda f: len(f["input_ids"]))

    def collator(self) -> D.PadCollator:
        """Right padding: the default for models that read the first token or mask the padding."""
        return D.PadCollator(self.tokenizer.pad_token_id, "right")

    def compute_metrics(self, pred: Any) -> dict[str, float]:
        """Accuracy of class predictions (``predictions`` are per-class scores)."""
        import numpy as np

        scores = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        labels = pred.label_ids
        return {"accuracy": float((np.asarray(scores).argmax(-1) == np.asarray(labels)).mean())}


class _PromptClsTask(_Task):
    """Prompt-based classification: train and score the label words' tokens after the prompt."""

    def __init__(self, model: Any, tokenizer: Any, fmt: D.PromptFormat, max_length: int) -> None:
        import inspect

        import torch

        super().__init__(tokenizer, max_length)
        self.fmt = fmt
        self.word_ids = torch.tensor(fmt.label_token_ids(tokenizer))
        params = inspect.signature(model.forward).parameters
        self.position_ids = "position_ids" in params
        # Only the last position's logits are needed: skip the LM head everywhere else.
        self.keep_last = "logits_to_keep" in params

    def encode(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return D.encode_prompt_cls(records, self.tokenizer, self.fmt, self.max_length)

    def collator(self) -> D.PadCollator:
        collate = D.PadCollator(self.tokenizer.pad_token_id, "left", self.position_ids)
        if not self.keep_last:
            return collate

        def with_keep(features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
            batch: dict[str, Any] = collate(features)
            batch["logits_to_keep"] = 1
            return batch

        return with_keep  # type: ignore[return-value]

    def compute_loss(self, outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
        """Cross-entropy over the label words' scores at the last position of the prompt.

        The scores are the next-token logits of the label words' tokens, so training pushes up
        the right word against the other label words only (the "train as classification" loss of
        LM-BFF and MeZO, the setup of the HiFT paper's prompt experiments).
        """
        import torch

        logits = outputs["logits"][:, -1, :].float()[:, self.word_ids.to(labels.device)]
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        n = num_items_in_batch if num_items_in_batch is not None else labels.numel()
        return loss / n

    def preprocess_logits(self, logits: Any, labels: Any) -> Any:
        """Keeps only the label words' log-likelihoods after the prompt: ``[batch, classes]``."""
        if isinstance(logits, tuple):
            logits = logits[0]
        logp = logits[:, -1, :].float().log_softmax(-1)
        return logp[:, self.word_ids.to(logp.device)]


class _SeqClsTask(_Task):
    """Sequence classification with the model's classification head (labels are class ids)."""

    def encode(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return D.encode_seq_cls(records, self.tokenizer, self.max_length)


class _SftTask(_Task):
    """Prompt/response pairs in the chat template; the loss is on the response tokens only."""

    def encode(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return D.encode_sft(records, self.tokenizer, self.max_length)

    compute_metrics = None  # type: ignore[assignment]  # eval loss only


class _ListDataset:
    """A map-style dataset over a list of tokenized examples."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


# --- progress, memory and interrupts -----------------------------------------------------------


class _MemorySampler:
    """Samples memory in a background thread, so each step's peak (not just its end) is seen."""

    def __init__(self, device: Any, interval: float = 0.02) -> None:
        from ..memory.measure import current_memory_mib

        self._read = lambda: current_memory_mib(device)
        self._interval = interval
        self._peak = self._read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="hiftune-memory")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._peak = max(self._peak, self._read())

    def take_peak(self) -> float:
        """The peak since the last call (and resets it to the current value)."""
        now = self._read()
        peak, self._peak = max(self._peak, now), now
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


class _Interrupt:
    """While active, the first Ctrl-C asks the Trainer to checkpoint and stop; the second aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("interrupted: saving a checkpoint after this step (Ctrl-C again to abort)")


def _make_progress(meta: Mapping[str, Any]) -> _Progress:
    """A ``TrainerCallback`` with :class:`_Progress`'s behaviour (transformers imported lazily)."""
    from transformers import TrainerCallback

    cls = type("HiFTuneProgressCallback", (_Progress, TrainerCallback), {})
    return cls(meta)


class _Progress:
    """Mixed into a ``TrainerCallback``: tqdm bar (loss, active group, memory), per-step log, interrupts, run config in checkpoints."""

    def __init__(self, meta: Mapping[str, Any]) -> None:
        self.meta = meta
        self.steps: list[dict[str, Any]] = []
        self.interrupt: _Interrupt | None = None
        self._bar: Any = None
        self._sampler: _MemorySampler | None = None
        self._group = ""
        self._t0 = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=state.max_steps, initial=state.global_step, desc="train", unit="step"
        )
        self._sampler = _MemorySampler(args.device)
        self._t0 = time.perf_counter()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from ..integrations.transformers import unwrap_hift

        hift = unwrap_hift(kwargs.get("optimizer"))
        # The group active now is the one this step trains (the optimizer moves on in step()).
        self._group = hift.group_names[hift.active_group] if hift is not None else "all"

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        mem = self._sampler.take_peak() if self._sampler else float("nan")
        self.steps.append(
            {
                "step": state.global_step,
                "group": self._group,
                "memory_mib": round(mem, 1),
                "seconds": round(time.perf_counter() - self._t0, 2),
            }
        )
        if self._bar is not None:
            self._bar.update(state.global_step - self._bar.n)
        if self.interrupt is not None and self.interrupt.requested:
            control.should_save = True
            control.should_training_stop = True

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
    ) -> None:
        if not logs or "loss" not in logs or not self.steps:
            return
        last = self.steps[-1]
        if last["step"] == state.global_step:
            last["loss"] = float(logs["loss"])
            last["lr"] = float(logs.get("learning_rate", float("nan")))
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{logs['loss']:.4f}", group=self._group, mem=f"{last['memory_mib']:.0f}MiB"
            )

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Every checkpoint carries the run's config, so --resume can check it belongs to this run.
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            (ckpt / RUN_CONFIG).write_text(json.dumps(self.meta, indent=2) + "\n")

    def close(self) -> None:
        """Closes the bar and stops the memory sampler."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
        for s in self.steps:
            s.setdefault("loss", float("nan"))
