"""The training recipe: fine-tune a model end to end with HiFT (or plain full fine-tuning).

``Recipe(TrainRecipeConfig(...)).run()`` is what ``hiftune train`` does, usable from Python
without the command line. It is a thin layer over ``transformers.Trainer``: ``method="hift"`` uses
:class:`hiftune.integrations.transformers.HiFTTrainer`, ``method="fpft"`` the plain ``Trainer``
with the very same arguments, so both run the same loop. The recipe adds only what it needs
around it: data and model loading (:mod:`.data`, :mod:`.models`), the task's encoding, loss and
metrics (:mod:`.tasks`), the ``TrainingArguments`` (:mod:`.arguments`), the plan stated before
training (:mod:`.plan`), a progress bar, per-step log and resumable interrupts (:mod:`.callbacks`),
held-out answers of generation tasks (:mod:`.samples`) and the report (:mod:`.report`), which
covers the steps before a resume too (:mod:`.history`). Bad input raises
:class:`~hiftune.errors.UserError`.

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
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers
from transformers import Trainer

from ..engine.optimizers import resolve_optimizer
from ..errors import UserError
from ..integrations.transformers import HiFTTrainer, unwrap_hift
from .arguments import RESUMABLE, TRAINING_ARGS, optimizer_kwargs, training_arguments
from .callbacks import Interrupt, Progress, RunFinished, StopIfFinished
from .chat import set_chat_template
from .config import (
    RESUMABLE_CHANGES,
    RUN_CONFIG,
    TrainRecipeConfig,
    find_checkpoint,
    saved_run,
)
from .examples import Examples, load_examples
from .guards import NonFiniteGuard
from .history import History
from .launch import resume_command
from .models import (
    PRESETS,
    ModelError,
    ModelSource,
    check_model_fits,
    load_model_and_tokenizer,
    resolve_model,
)
from .plan import Plan, build_plan
from .report import format_metrics, write_report
from .rundir import OutputDir, is_main_process, launched_processes, on_main, owned_process_group
from .safe_io import check_output_dir, checkpoint_writes, save_final_model
from .samples import HeldOut
from .schedule import NONE, Schedule, planned_steps, resolve_always_active, resolve_schedule
from .sources import data_identity
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
            ``SIGHUP``; ``None`` if it finished, or if another process of the run received it).
        main_process: Whether this process wrote the run's files (under ``torchrun`` or
            ``accelerate launch`` the others trained alongside it and return the same report).
    """

    output_dir: Path
    steps: int
    report: dict[str, Any] | None
    checkpoint: Path | None = None
    signum: int | None = None
    main_process: bool = True

    @property
    def interrupted(self) -> bool:
        """Whether a Ctrl-C stopped the run after saving :attr:`checkpoint`."""
        return self.report is None

    @property
    def resume_command(self) -> str | None:
        """The shell command that resumes an interrupted run from :attr:`checkpoint`, as it
        works in the current directory (``.venv/bin/hiftune train --resume ...`` when
        ``hiftune`` is not on the ``PATH``); ``None`` if the run finished."""
        return resume_command(self.checkpoint) if self.checkpoint is not None else None


class Recipe:
    """One training run; :meth:`run` does everything.

    To continue an interrupted run, build the config with
    :func:`~hiftune.recipes.config.build_config` and ``{"resume": checkpoint}``: it takes the
    saved run's configuration, which a resumed run must keep.

    Args:
        cfg: The validated configuration.
        verbose: Keep ``transformers``' own info logging and progress bars (by default they are
            silenced during the run, which would otherwise bury the recipe's one progress bar).
        on_plan: Called with the :class:`~hiftune.recipes.plan.Plan` before training (the
            command line prints it); without it the plan is logged.
    """

    def __init__(
        self,
        cfg: TrainRecipeConfig,
        verbose: bool = False,
        on_plan: Callable[[Plan], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.verbose = verbose
        self.on_plan = on_plan

    def run(self) -> TrainResult:
        """Loads, evaluates zero-shot, trains, evaluates, saves and reports.

        A Ctrl-C during training saves a checkpoint after the current step and returns early
        (see :attr:`TrainResult.interrupted`); a second one aborts with ``KeyboardInterrupt``.

        Raises:
            UserError: For bad input: a missing model or data file, a task the model cannot do,
                a checkpoint of another run, and so on.
        """
        with (
            _quiet_transformers(self.verbose),
            owned_process_group(),
            contextlib.ExitStack() as held,
        ):
            return self._run(held)

    def _run(self, held: contextlib.ExitStack) -> TrainResult:
        cfg = self.cfg
        t_start = time.perf_counter()
        checkpoint = find_checkpoint(cfg.resume) if cfg.resume else None
        out_dir = Path(
            cfg.output_dir
            or (checkpoint.parent if checkpoint else Path("runs") / self._default_name())
        )
        if launched_processes() > 1:
            # Under torchrun / accelerate launch: the process group first (building the
            # TrainingArguments starts it), so that the main process's checks reach the others.
            self._check_launch(training_arguments(cfg, out_dir).world_size)
        main = is_main_process()  # the process that holds and writes the output directory
        # A read-only or misnamed directory: before the slow part.
        on_main(lambda: check_output_dir(out_dir))
        source = resolve_model(cfg.model, cfg.revision, cfg.trust_remote_code)
        preset = source.preset
        if preset is not None and cfg.task not in preset.tasks:
            raise ModelError(
                f"{preset.name} ({preset.description}) cannot do --task {cfg.task}; "
                f"it does {', '.join(preset.tasks)}"
            )
        examples = self._load_data()
        splits, classes = examples.splits, examples.classes
        # Before the slow part: one run per directory, for the whole run.
        out = OutputDir(out_dir, checkpoint, overwrite=cfg.overwrite_output_dir)
        on_main(lambda: held.enter_context(out))
        # Options TrainingArguments refuses, before the slow part too (only now: building one
        # resets accelerate's process state, which a run holding this directory may be using).
        args = training_arguments(cfg, out_dir)
        transformers.set_seed(cfg.seed)  # seeds a new classification head, too
        model, tokenizer, new_weights = load_model_and_tokenizer(
            source,
            cfg.task,
            name=cfg.model,
            dtype=cfg.dtype,
            loading_info=True,
            labels=classes,  # seq-cls: the saved model's config names the user's classes
        )
        if cfg.chat_template is not None:  # before encoding; saved with the model's tokenizer
            set_chat_template(tokenizer, cfg.chat_template)
        hift = cfg.method == "hift"
        always = resolve_always_active(model, cfg.always_active if hift else NONE, new_weights)
        n_units = check_model_fits(
            model,
            max_length=cfg.max_length,
            units_per_group=cfg.units_per_group if hift else None,
            name=cfg.model,
            config=cfg.hift_config(always_active=always.patterns),
        )
        identity = self._identity(source, classes)
        saved = self._check_resume(checkpoint, identity) if checkpoint is not None else None
        task = build_task(cfg, model, tokenizer, classes)
        train_ds = task.encode(splits["train"])
        eval_ds = task.encode_eval(splits["eval"])

        if main:
            out_dir.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {"config": cfg.to_dict(), "identity": identity}
        meta["data_splits"] = examples.description  # "train: 900 ('train' split ...); eval: ..."
        meta["eval_split"] = examples.eval_split  # the split evaluated on (cfg.eval_split: None)
        if saved is not None:
            meta["zero_shot"] = saved.get("zero_shot")
        # The run's optimizer steps as the Trainer will count them, for the update budget.
        count_steps = functools.partial(
            planned_steps,
            len(train_ds),
            batch_size=args.train_batch_size,
            grad_accum=args.gradient_accumulation_steps,
            processes=args.world_size,
            drop_last=args.dataloader_drop_last,
        )
        schedule = resolve_schedule(
            cfg,
            always=always,
            n_units=n_units,
            total_steps=count_steps(epochs=args.num_train_epochs, max_steps=args.max_steps),
            # A resumed auto run keeps the split its checkpoint holds.
            resumed_units_per_group=((saved or {}).get("schedule") or {}).get("units_per_group"),
        )
        meta["schedule"] = schedule.to_dict()
        # Before the Trainer, which changes the model's config (use_cache).
        plan = build_plan(
            model,
            cfg,
            name=cfg.model,
            schedule=schedule,
            steps_per_epoch=None if args.max_steps > 0 else count_steps(),
            data=meta.get("data_splits"),
            train_examples=len(train_ds),
            eval_examples=len(eval_ds),
        )
        meta["plan"] = plan.to_dict()
        if main and self.on_plan is not None:
            self.on_plan(plan)
        elif main:
            logger.info("%s", plan.format())
        for warning in plan.warnings if main else []:
            logger.warning("%s", warning)

        interrupt = Interrupt()
        progress = Progress(meta, interrupt)
        history = History(meta, progress, saved, started=t_start)
        trainer = self._build_trainer(model, tokenizer, task, train_ds, eval_ds, out_dir, schedule)
        trainer.add_callback(history)  # first: it updates what progress saves with a checkpoint
        trainer.add_callback(progress)
        guard = NonFiniteGuard()
        trainer.add_callback(guard)
        trainer.add_callback(StopIfFinished())

        if checkpoint is None and cfg.zero_shot:  # every process: the Trainer shares the data
            if main:
                logger.info(
                    "zero-shot evaluation on %d %s examples", len(eval_ds), examples.eval_split
                )
            meta["zero_shot"] = self._evaluate(trainer, "zero-shot")
        # sft: held-out prompts answered by the base model now (with the zero-shot evaluation:
        # its exact match and ROUGE-L join those metrics; a resumed run's base answers come with
        # its checkpoint) and by the fine-tuned one at the end. Only the main process asks.
        held_out = None
        if main and cfg.task == "sft":
            held_out = HeldOut.build(splits["eval"], tokenizer, cfg.max_length, cfg.eval_batch_size)
        if held_out is not None and saved is None:
            base = held_out.answer(model, meta.get("zero_shot"), "zero-shot")
            meta["samples"] = held_out.samples(base)
        elif held_out is not None and saved is not None:
            meta["samples"] = held_out.resumed_samples(saved.get("samples"))
        if main:
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
            if main:
                logger.info("checkpoint saved to %s", last)
            return TrainResult(
                out_dir, trainer.state.global_step, None, last, interrupt.signum, main
            )

        final = self._evaluate(trainer, "fine-tuned")
        if cfg.also_eval:
            extra = ListDataset(task.encode_eval(splits["also"]))
            meta["also_eval"] = {cfg.also_eval: self._evaluate(trainer, cfg.also_eval, extra)}
        if main:  # (the Trainer saves on the main process only; every rank has these weights)
            save_final_model(trainer, out_dir)  # with the tokenizer (its processing_class)
        self._close(trainer)
        if held_out is not None:
            answers = held_out.answer(trainer.model, final, "fine-tuned")
            held_out.add_fine_tuned(meta["samples"], answers)
        device = trainer.args.device
        report = write_report(
            out_dir,
            cfg,
            meta=meta,
            final=final,
            # The whole run's, also the steps before a resume.
            steps=history.steps(),
            hift=unwrap_hift(trainer.optimizer),
            epochs=trainer.state.epoch or 0.0,
            global_step=trainer.state.global_step,
            train_loss=history.train_loss(getattr(result, "training_loss", float("nan"))),
            train_seconds=history.train_seconds(train_seconds),
            total_seconds=history.total_seconds(),
            peak_memory_mib=history.peak_memory_mib(),
            memory_kind="CUDA allocated" if device.type == "cuda" else "resident set",
            n_train=len(train_ds),
            n_eval=len(eval_ds),
            plan=plan.to_dict(),
            samples=meta.get("samples"),
            write=main,
        )
        return TrainResult(out_dir, trainer.state.global_step, report, main_process=main)

    @staticmethod
    def _check_launch(trainer_processes: int) -> None:
        """Refuses a launch the Trainer does not see (each process would train alone)."""
        if trainer_processes != launched_processes():
            # accelerate joins CPU processes only when told to run on the CPU (use_cpu).
            raise UserError(
                f"hiftune train was launched on {launched_processes()} processes but the "
                f"Trainer runs {trainer_processes}; on a machine without CUDA GPUs, add --use-cpu"
            )

    def _default_name(self) -> str:
        # A preset's name; a directory's or Hub id's last part (Qwen/Qwen2.5-0.5B: Qwen2.5-0.5B).
        model = self.cfg.model if self.cfg.model in PRESETS else Path(self.cfg.model).name
        return f"{model}-{self.cfg.task}-{self.cfg.method}"

    def _load_data(self) -> Examples:
        """The run's examples, classes and splits (see :func:`.examples.load_examples`)."""
        return load_examples(self.cfg, verbose=self.verbose)

    def _identity(self, source: ModelSource, classes: list[str] | None) -> dict[str, Any]:
        """What a checkpoint must share with this run to be resumed by it."""
        cfg = self.cfg
        if source.preset is not None or source.hub:
            model = cfg.model
        else:
            model = str(Path(cfg.model).expanduser().resolve())
        where = source.location + (f"@{source.commit}" if source.commit else "")
        return {
            "model": model,
            "model_dir": where,  # not compared: a moved cache or a new conversion is fine
            "data": data_identity(cfg.data),
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
        their_extra, our_extra = theirs.pop(TRAINING_ARGS, {}), ours.pop(TRAINING_ARGS, {})
        for key, value in theirs.items():
            if key not in RESUMABLE_CHANGES and ours.get(key) != value:
                raise UserError(
                    f"--resume {checkpoint} is from a different run: it has {key}={value!r}, "
                    f"this run has {key}={ours.get(key)!r}"
                )
        # Pass-through TrainingArguments: an option either run left out has its default.
        for key in sorted((set(their_extra) | set(our_extra)) - RESUMABLE):
            if their_extra.get(key) != our_extra.get(key):
                raise UserError(
                    f"--resume {checkpoint} is from a different run: it has "
                    f"{key}={their_extra.get(key, 'default')!r}, this run has "
                    f"{key}={our_extra.get(key, 'default')!r}"
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
        schedule: Schedule,
    ) -> Trainer:
        cfg = self.cfg
        args = training_arguments(cfg, out_dir, loss_only=task.compute_metrics is None)
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
            optimizer_cls_and_kwargs=resolve_optimizer(cfg.optimizer, **optimizer_kwargs(cfg)),
            processing_class=tokenizer,
        )
        trainer: Trainer
        if cfg.method == "hift":
            hift_config = cfg.hift_config(
                units_per_group=schedule.units_per_group, always_active=schedule.always_active
            )
            trainer = HiFTTrainer(hift_config=hift_config, **common)
        else:
            trainer = Trainer(**common)
        # The recipe's progress bar replaces the Trainer's printed logs.
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        return trainer

    def _evaluate(self, trainer: Trainer, what: str, dataset: Any = None) -> dict[str, float]:
        metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix="eval")
        out = {k.removeprefix("eval_"): v for k, v in metrics.items()}
        if trainer.is_world_process_zero():  # the same metrics on every process
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
