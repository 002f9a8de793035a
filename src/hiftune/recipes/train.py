"""The training recipe: fine-tune a model end to end with HiFT (or plain full fine-tuning).

``Recipe(TrainRecipeConfig(...)).run()`` is what ``hiftune train`` does, usable from Python
without the command line. It is a thin layer over ``transformers.Trainer``: ``method="hift"`` uses
:class:`hiftune.integrations.transformers.HiFTTrainer`, ``method="fpft"`` the plain ``Trainer``
with the very same arguments, so both run the same loop. The recipe adds only what it needs
around it: data and model loading (:mod:`.data`, :mod:`.models`), the task's encoding, loss and
metrics (:mod:`.tasks`), a progress bar, per-step log and resumable interrupts (:mod:`.callbacks`)
and the report (:mod:`.report`). Bad input raises :class:`~hiftune.errors.UserError`.

With the default configuration it fine-tunes SmolLM2-135M-Instruct on the bundled movie-review
sentiment task as prompt-based classification (``<sentence> It was great`` / ``... terrible``),
evaluating before and after, and saves the model and a report under ``runs/``.

Example::

    from hiftune.recipes.config import TrainRecipeConfig
    from hiftune.recipes.train import Recipe

    result = Recipe(TrainRecipeConfig(max_steps=20, output_dir="runs/try")).run()
    print(result.report["final"])
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import Trainer, TrainingArguments

from ..engine.config import HiFTConfig
from ..engine.optimizers import resolve_optimizer
from ..errors import UserError, first_line
from ..integrations.transformers import HiFTTrainer, unwrap_hift
from . import data as D
from .callbacks import Interrupt, Progress, RunFinished, StopIfFinished
from .config import RESUMABLE_CHANGES, RUN_CONFIG, TrainRecipeConfig, find_checkpoint, saved_run
from .guards import NonFiniteGuard
from .models import (
    PRESETS,
    ModelError,
    check_model_fits,
    load_model_and_tokenizer,
    resolve_model,
)
from .report import format_metrics, write_report
from .rundir import OutputDir
from .safe_io import check_output_dir, checkpoint_writes, save_final_model
from .tasks import ListDataset, Task, build_task

logger = logging.getLogger(__name__)

Records = list[dict[str, Any]]


@dataclass
class TrainResult:
    """What :meth:`Recipe.run` returns.

    Attributes:
        output_dir: Where the model, the report and any checkpoints are.
        steps: Optimizer steps trained (counting those before a resume).
        report: The content of ``report.json`` (``None`` if the run was interrupted).
        checkpoint: The checkpoint to resume an interrupted run from (``None`` if it finished).
        signum: The signal that interrupted the run (``signal.SIGINT`` for Ctrl-C, ``SIGTERM``,
            ``SIGHUP``; ``None`` if it finished).
    """

    output_dir: Path
    steps: int
    report: dict[str, Any] | None
    checkpoint: Path | None = None
    signum: int | None = None

    @property
    def interrupted(self) -> bool:
        """Whether a Ctrl-C stopped the run after saving :attr:`checkpoint`."""
        return self.report is None


class Recipe:
    """One training run; :meth:`run` does everything.

    To continue an interrupted run, build the config with
    :func:`~hiftune.recipes.config.build_config` and ``{"resume": checkpoint}``: it takes the
    saved run's configuration, which a resumed run must keep.

    Args:
        cfg: The validated configuration.
        verbose: Keep ``transformers``' own info logging and progress bars (by default they are
            silenced during the run, which would otherwise bury the recipe's one progress bar).
    """

    def __init__(self, cfg: TrainRecipeConfig, verbose: bool = False) -> None:
        self.cfg = cfg
        self.verbose = verbose

    def run(self) -> TrainResult:
        """Loads, evaluates zero-shot, trains, evaluates, saves and reports.

        A Ctrl-C during training saves a checkpoint after the current step and returns early
        (see :attr:`TrainResult.interrupted`); a second one aborts with ``KeyboardInterrupt``.

        Raises:
            UserError: For bad input: a missing model or data file, a task the model cannot do,
                a checkpoint of another run, and so on.
        """
        with _quiet_transformers(self.verbose), contextlib.ExitStack() as held:
            return self._run(held)

    def _run(self, held: contextlib.ExitStack) -> TrainResult:
        cfg = self.cfg
        t_start = time.perf_counter()
        checkpoint = find_checkpoint(cfg.resume) if cfg.resume else None
        out_dir = Path(
            cfg.output_dir
            or (checkpoint.parent if checkpoint else Path("runs") / self._default_name())
        )
        check_output_dir(out_dir)  # a read-only or misnamed directory: before the slow part
        model_dir, preset = resolve_model(cfg.model)
        if preset is not None and cfg.task not in preset.tasks:
            raise ModelError(
                f"{preset.name} ({preset.description}) cannot do --task {cfg.task}; "
                f"it does {', '.join(preset.tasks)}"
            )
        splits, classes = self._load_data()
        # Before the slow part: one run per directory, for the whole run.
        held.enter_context(OutputDir(out_dir, checkpoint, overwrite=cfg.overwrite_output_dir))
        transformers.set_seed(cfg.seed)  # seeds a new classification head, too
        model, tokenizer = load_model_and_tokenizer(
            model_dir, cfg.task, num_labels=len(classes or [0, 1]), name=cfg.model
        )
        check_model_fits(
            model,
            max_length=cfg.max_length,
            units_per_group=cfg.units_per_group if cfg.method == "hift" else None,
            name=cfg.model,
        )
        identity = self._identity(model_dir, classes)
        saved = self._check_resume(checkpoint, identity) if checkpoint is not None else None
        task = build_task(cfg, model, tokenizer, classes)
        train_ds = task.encode(splits["train"])
        eval_ds = task.encode_eval(splits["eval"])

        out_dir.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {"config": cfg.to_dict(), "identity": identity}
        if saved is not None:
            meta["zero_shot"] = saved.get("zero_shot")
        interrupt = Interrupt()
        progress = Progress(meta, interrupt)
        trainer = self._build_trainer(model, tokenizer, task, train_ds, eval_ds, out_dir)
        trainer.add_callback(progress)
        guard = NonFiniteGuard()
        trainer.add_callback(guard)
        trainer.add_callback(StopIfFinished())

        if checkpoint is None and cfg.zero_shot:
            logger.info("zero-shot evaluation on %d %s examples", len(eval_ds), cfg.eval_split)
            meta["zero_shot"] = self._evaluate(trainer, "zero-shot")
        (out_dir / RUN_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")

        t_train = time.perf_counter()
        result: Any = None
        with (
            contextlib.closing(progress),  # also on an error: its line must not run into the bar
            interrupt,
            checkpoint_writes(out_dir, trainer),  # a full disk: one line, no partial checkpoint
            contextlib.suppress(RunFinished),  # a finished run resumed: no more steps
        ):
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        train_seconds = time.perf_counter() - t_train
        progress.close()
        if guard.failure is not None:
            self._close(trainer)
            guard.check()
        if interrupt.requested:
            self._close(trainer)
            last = out_dir / f"checkpoint-{trainer.state.global_step}"
            logger.info("checkpoint saved to %s", last)
            return TrainResult(out_dir, trainer.state.global_step, None, last, interrupt.signum)

        final = self._evaluate(trainer, "fine-tuned")
        if cfg.also_eval:
            extra = ListDataset(task.encode_eval(splits["also"]))
            meta["also_eval"] = {cfg.also_eval: self._evaluate(trainer, cfg.also_eval, extra)}
        save_final_model(trainer, out_dir)  # with the tokenizer (the Trainer's processing_class)
        self._close(trainer)
        device = trainer.args.device
        report = write_report(
            out_dir,
            cfg,
            meta=meta,
            final=final,
            steps=progress.steps,
            hift=unwrap_hift(trainer.optimizer),
            epochs=trainer.state.epoch or 0.0,
            global_step=trainer.state.global_step,
            train_loss=getattr(result, "training_loss", float("nan")),
            train_seconds=train_seconds,
            total_seconds=time.perf_counter() - t_start,
            peak_memory_mib=progress.peak_mib(),
            memory_kind="CUDA allocated" if device.type == "cuda" else "resident set",
            n_train=len(train_ds),
            n_eval=len(eval_ds),
        )
        return TrainResult(out_dir, trainer.state.global_step, report)

    def _default_name(self) -> str:
        model = self.cfg.model if self.cfg.model in PRESETS else Path(self.cfg.model).name
        return f"{model}-{self.cfg.task}-{self.cfg.method}"

    def _load_data(self) -> tuple[dict[str, Records], list[str] | None]:
        """The training and evaluation examples (and ``also`` for ``also_eval``), and classes."""
        cfg = self.cfg
        classes: list[str] | None = None
        if cfg.data is None:
            splits = D.sentiment_splits()
            if cfg.task == "sft":
                splits = {k: D.as_sft(v) for k, v in splits.items()}
            else:
                classes = ["negative", "positive"]
        else:
            records = D.read_records(cfg.data)
            if cfg.task == "sft":
                fields = {"prompt": cfg.prompt_field, "response": cfg.response_field}
            else:
                fields = {"text": cfg.text_field, "label": cfg.label_field}
            records = D.select_fields(records, fields, cfg.data)
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
        saved = saved_run(checkpoint)
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

    def _build_trainer(
        self,
        model: Any,
        tokenizer: Any,
        task: Task,
        train_ds: Records,
        eval_ds: Records,
        out_dir: Path,
    ) -> Trainer:
        cfg = self.cfg
        try:
            args = self._training_arguments(out_dir)
        except ValueError as e:  # e.g. a precision this machine does not support
            raise UserError(f"invalid training arguments: {first_line(e)}") from e
        common: dict[str, Any] = dict(
            model=model,
            args=args,
            train_dataset=ListDataset(train_ds),
            eval_dataset=ListDataset(eval_ds),
            data_collator=task.collator(),
            compute_metrics=task.compute_metrics,
            compute_loss_func=task.compute_loss,
            preprocess_logits_for_metrics=task.preprocess_logits,
            # The one optimizer registry: HiFT wraps the very class FPFT uses.
            optimizer_cls_and_kwargs=resolve_optimizer(cfg.optimizer, lr=cfg.lr),
            processing_class=tokenizer,
        )
        trainer: Trainer
        if cfg.method == "hift":
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
        # The recipe's progress bar replaces the Trainer's printed logs.
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        return trainer

    def _training_arguments(self, out_dir: Path) -> TrainingArguments:
        cfg = self.cfg
        # FPFT's bf16 is the Trainer's autocast; HiFT's mixed precision lives in its optimizer.
        autocast_bf16 = cfg.method == "fpft" and cfg.precision == "bf16"
        return TrainingArguments(
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
            logging_nan_inf_filter=False,  # a nan loss is logged (and stops the run) as nan
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
            bf16=autocast_bf16,
            # bf16 autocast without CUDA: the Trainer must be told that it runs on the CPU.
            use_cpu=autocast_bf16 and not torch.cuda.is_available(),
            label_names=["labels"],
            # sft has no metric beyond the loss: keep no [batch, length, vocab] logits around.
            prediction_loss_only=cfg.task == "sft",
        )

    def _evaluate(self, trainer: Trainer, what: str, dataset: Any = None) -> dict[str, float]:
        metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix="eval")
        out = {k.removeprefix("eval_"): v for k, v in metrics.items()}
        logger.info("%s: %s", what, format_metrics(out))
        return out

    def _close(self, trainer: Trainer) -> None:
        hift = unwrap_hift(trainer.optimizer)
        if hift is not None:
            hift.close()


@contextlib.contextmanager
def _quiet_transformers(verbose: bool) -> Iterator[None]:
    """Silences ``transformers``' info logging and progress bars for the run, then restores them.

    Their per-load reports and bars would bury the recipe's one progress bar; errors still show.
    """
    if verbose:
        yield
        return
    level = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.logging.enable_progress_bar()
