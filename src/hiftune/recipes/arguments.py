"""Every ``transformers.TrainingArguments`` option in the recipe, with hiftune's names and defaults.

``hiftune train`` has its own short names for the options it has always had (``lr``, ``epochs``,
``batch_size``, ...): :data:`ALIASES` maps each to the ``TrainingArguments`` field it sets, so
``--lr`` and ``--learning-rate`` are one option (giving both with different values is an error).
Options that have the same name in both (``seed``, ``max_steps``, ``weight_decay``, ...) are
hiftune's fields. Every other ``TrainingArguments`` field is passed through unchanged, from the
command line, a config file or :attr:`TrainRecipeConfig.training_args`, except those the recipe
controls itself (:data:`CONTROLLED`, and for HiFT :data:`HIFT_CONFLICTS`), which are refused with
the reason. :func:`training_arguments` builds the ``TrainingArguments`` of a run: hiftune's
defaults (log every step, no external reporting, its own progress bar, ...), then the user's
options on top.

``transformers`` is imported only when a ``TrainingArguments`` name has to be looked up, so a
configuration that uses hiftune's names alone never pays for it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError, first_line

#: hiftune's option -> the ``TrainingArguments`` field it is (hiftune keeps its own default).
ALIASES: Mapping[str, str] = types.MappingProxyType(
    {
        "lr": "learning_rate",
        "epochs": "num_train_epochs",
        "batch_size": "per_device_train_batch_size",
        "eval_batch_size": "per_device_eval_batch_size",
        "grad_accum": "gradient_accumulation_steps",
        "scheduler": "lr_scheduler_type",
    }
)
#: ``TrainingArguments`` options the recipe sets itself: name -> why they cannot be given.
CONTROLLED: Mapping[str, str] = types.MappingProxyType(
    {
        "optim": "hiftune builds the optimizer itself: use --optimizer (HiFT wraps that class)",
        "optim_args": "hiftune builds the optimizer itself: use --optimizer",
        "optim_target_modules": "hiftune builds the optimizer itself: use --optimizer",
        "resume_from_checkpoint": "use --resume (it checks that the checkpoint is of this run)",
        "logging_steps": "hiftune logs every step (its per-step report and non-finite-loss stop)",
        "logging_strategy": "hiftune logs every step (its per-step report and non-finite-loss stop)",
        "logging_nan_inf_filter": "a non-finite loss stops the run; it is never filtered",
        "remove_unused_columns": "the recipe's collator builds exactly the model's inputs",
        "label_names": "the recipe's tasks name their labels themselves",
    }
)
#: Options that conflict with HiFT (``--method hift``) only: name -> why.
HIFT_CONFLICTS: Mapping[str, str] = types.MappingProxyType(
    {
        "fp16": "for HiFT use --precision fp16 (mixed precision with loss scaling in the optimizer)",
        "deepspeed": "the recipe does not set DeepSpeed up for HiFT, whose trainable parameters "
        "change every step; run data parallel with torchrun (HiFT averages the gradients)",
        "fsdp": "the recipe does not set FSDP up for HiFT, whose trainable parameters change "
        "every step; run data parallel with torchrun (HiFT averages the gradients)",
    }
)
#: Adam's options, which go to the optimizer (``--optimizer adamw`` only): name -> its argument.
ADAM_OPTIONS: Mapping[str, str] = types.MappingProxyType(
    {"adam_beta1": "betas", "adam_beta2": "betas", "adam_epsilon": "eps"}
)
#: Pass-through options a resumed run may change: they do not change what is trained.
RESUMABLE: frozenset[str] = frozenset(
    {
        "report_to", "run_name", "project", "trackio_space_id", "trackio_bucket_id",
        "trackio_static_space_id", "disable_tqdm", "log_level", "log_level_replica",
        "log_on_each_node", "logging_first_step", "skip_memory_metrics",
        "eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "eval_accumulation_steps",
        "eval_do_concat_batches", "include_for_metrics", "batch_eval_metrics",
        "save_strategy", "save_total_limit", "save_on_each_node", "save_only_model",
        "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy",
        "hub_always_push", "hub_revision", "gradient_checkpointing",
        "gradient_checkpointing_kwargs", "activation_checkpointing",
        "activation_checkpointing_kwargs", "torch_empty_cache_steps",
        "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
        "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
        "do_train", "do_eval", "do_predict", "ddp_timeout", "local_rank",
    }
)  # fmt: skip

#: hiftune's one name for an option transformers renamed -> the newer name. Every transformers
#: version hiftune supports takes the old name, and those that have the newer one warn that the
#: old is deprecated: :func:`training_arguments` sets the newer one where it exists.
RENAMED: Mapping[str, str] = types.MappingProxyType(
    {
        "gradient_checkpointing": "activation_checkpointing",
        "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
    }
)

#: Where a configuration's pass-through ``TrainingArguments`` options live.
TRAINING_ARGS = "training_args"


@functools.cache
def training_argument_fields() -> Mapping[str, Any]:
    """``TrainingArguments``' init fields: name -> resolved type (imports ``transformers``)."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return types.MappingProxyType(
        {f.name: hints[f.name] for f in dataclasses.fields(TrainingArguments) if f.init}
    )


def normalize(values: Mapping[str, Any], recipe_keys: frozenset[str], where: str) -> dict[str, Any]:
    """Sorts option values into the recipe's fields and pass-through ``TrainingArguments``.

    A ``TrainingArguments`` name of one of hiftune's options (``learning_rate``) becomes that
    option (``lr``); other ``TrainingArguments`` names go under :data:`TRAINING_ARGS`.

    Args:
        values: Option name -> value, with dashes or underscores; may hold a
            :data:`TRAINING_ARGS` mapping itself.
        recipe_keys: The recipe's own option names.
        where: Where the values came from, for error messages (``"the command line"``, a file).

    Raises:
        UserError: For an unknown name, or an option given twice (as hiftune's name and as the
            ``TrainingArguments`` name) with different values.
    """
    out: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    given_as: dict[str, str] = {}  # recipe option -> the name it was given under
    by_ta_name = {ta: ours for ours, ta in ALIASES.items()}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name == TRAINING_ARGS:
            if not isinstance(value, Mapping):
                raise UserError(f"{TRAINING_ARGS} in {where} must be a mapping of option: value")
            extra.update({str(k).replace("-", "_"): v for k, v in value.items()})
            continue
        if name in recipe_keys or name in by_ta_name:
            ours = by_ta_name.get(name, name)
            if ours in out and not _same(out[ours], value):
                raise UserError(
                    f"{given_as[ours]}={out[ours]!r} and {key}={value!r} in {where} are the same "
                    "option with different values; give one"
                )
            out[ours], given_as[ours] = value, str(key)
            continue
        if name not in training_argument_fields():
            raise UserError(
                f"unknown option {key!r} in {where}; the options are hiftune train's "
                "(hiftune train --help) and any transformers TrainingArguments field"
            )
        extra[name] = value
    if extra:
        out[TRAINING_ARGS] = extra
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal, also as numbers written differently (``1e-4`` from YAML text and ``0.0001``)."""
    try:
        return a == b or math.isclose(float(a), float(b), rel_tol=1e-12)
    except (TypeError, ValueError):
        return False


def check_training_args(
    extra: Mapping[str, Any], *, method: str, optimizer: str, own: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Validates pass-through options; returns them with numeric text turned into numbers.

    Args:
        extra: Option name -> value.
        method: The run's method (some options conflict with HiFT only).
        optimizer: The run's optimizer name (Adam's options need ``adamw``).
        own: The recipe's own option names, which cannot be passed through.

    Raises:
        UserError: For a name that is not a ``TrainingArguments`` field, one of hiftune's own
            options (under its name or its ``TrainingArguments`` name), or an option the recipe
            controls.
    """
    if not extra:
        return {}
    fields = training_argument_fields()
    aliased = {ta: ours for ours, ta in ALIASES.items()}
    out = {}
    for name, value in extra.items():
        if name in aliased or name in own:
            ours = aliased.get(name, name)
            raise UserError(f"{name} is hiftune's own option {ours}: set that instead")
        if name not in fields:
            raise UserError(f"{name} is not a transformers TrainingArguments option")
        if name in CONTROLLED:
            raise UserError(f"{name} cannot be set: {CONTROLLED[name]}")
        if method == "hift" and name in HIFT_CONFLICTS and value:
            raise UserError(f"{name} cannot be used with --method hift: {HIFT_CONFLICTS[name]}")
        if name in ADAM_OPTIONS and optimizer != "adamw":
            raise UserError(f"{name} is an option of --optimizer adamw, not {optimizer}")
        out[name] = _coerce(value, fields[name])
    return out


def _coerce(value: Any, kind: Any) -> Any:
    """Numeric text as a number for a numeric field (YAML reads ``1e-4`` as a string)."""
    if not isinstance(value, str):
        return value.value if isinstance(value, enum.Enum) else value
    args = typing.get_args(kind) or (kind,)
    for number in (int, float):
        if number in args:
            try:
                parsed = float(value)
            except ValueError:
                return value
            return int(parsed) if number is int and parsed.is_integer() else parsed
    return value


def _renamed(extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` with the :data:`RENAMED` options under their newer names, where they exist.

    Raises:
        UserError: If an option is given under both names with different values.
    """
    fields = training_argument_fields()
    for old, new in RENAMED.items():
        if old not in extra or new not in fields:
            continue
        value = extra.pop(old)
        if new in extra and extra[new] != value:
            raise UserError(
                f"{old}={value!r} and {new}={extra[new]!r} are the same option with different "
                f"values; give {old}"
            )
        extra[new] = value
    return extra


def optimizer_kwargs(cfg: Any) -> dict[str, Any]:
    """The optimizer's keyword arguments from the configuration: ``lr`` and Adam's options."""
    kwargs: dict[str, Any] = {"lr": cfg.lr}
    extra = cfg.training_args
    if "adam_beta1" in extra or "adam_beta2" in extra:
        kwargs["betas"] = (
            float(extra.get("adam_beta1", 0.9)),
            float(extra.get("adam_beta2", 0.999)),
        )
    if "adam_epsilon" in extra:
        kwargs["eps"] = float(extra["adam_epsilon"])
    return kwargs


def training_arguments(cfg: Any, out_dir: Path, *, loss_only: bool = False) -> Any:
    """The run's ``transformers.TrainingArguments``: hiftune's defaults, then the user's options.

    Args:
        cfg: The run's :class:`~hiftune.recipes.config.TrainRecipeConfig`.
        out_dir: The output directory.
        loss_only: The task has no metric beyond the loss (``prediction_loss_only``: keep no
            ``[batch, length, vocab]`` logits around in evaluation).

    Raises:
        UserError: If ``TrainingArguments`` rejects the combination (its message, one line).
    """
    from transformers import TrainingArguments

    extra = _renamed({k: v for k, v in cfg.training_args.items() if k not in ADAM_OPTIONS})
    # FPFT's bf16 is the Trainer's autocast; HiFT's mixed precision lives in its optimizer.
    bf16 = bool(extra.pop("bf16", False)) or (cfg.method == "fpft" and cfg.precision == "bf16")
    values: dict[str, Any] = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio,  # a value below 1 is a fraction of the steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=1,
        logging_nan_inf_filter=False,  # a nan loss is logged (and stops the run) as nan
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,  # the recipe's bar shows loss, group and memory
        seed=cfg.seed,
        data_seed=cfg.seed,
        remove_unused_columns=False,  # the collator already builds exactly the model inputs
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        bf16=bf16,
        # Without CUDA the Trainer must be told it runs on the CPU for bf16 autocast, and for
        # accelerate to join the processes a launcher started into one run.
        use_cpu=(bf16 or int(os.environ.get("WORLD_SIZE", "1")) > 1)
        and not torch.cuda.is_available(),
        label_names=["labels"],
        prediction_loss_only=loss_only,
    )
    values.update(extra)
    try:
        return TrainingArguments(**values)
    except (ValueError, TypeError) as e:  # e.g. a precision this machine does not support
        raise UserError(f"invalid training arguments: {first_line(e)}") from e
