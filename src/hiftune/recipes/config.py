"""The training recipe's configuration: one validated record, config files and resume merging.

:class:`TrainRecipeConfig` is everything :class:`~hiftune.recipes.train.Recipe` does; its fields
are also the keys of a YAML or JSON config file and the ``hiftune train`` options.
:func:`build_config` layers the sources the way the command line does: defaults, then the saved
run of a checkpoint being resumed, then a config file, then explicit values. Every bad value is a
:class:`~hiftune.errors.UserError` naming the field.

The vocabularies are shared, not repeated: optimizer names and methods come from
:mod:`hiftune.engine.optimizers`, orders, offload targets and precisions from
:mod:`hiftune.engine.config`, tasks and models from :mod:`hiftune.recipes.models`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..engine.config import OFFLOADS, ORDERS, PRECISIONS
from ..engine.optimizers import METHODS, OPTIMIZERS
from ..errors import UserError, first_line
from .checkpoints import find_checkpoint
from .data import DEFAULT_TEMPLATE
from .models import DEFAULT_MODEL, TASKS

#: Learning-rate schedules (``transformers``' ``lr_scheduler_type`` names).
SCHEDULERS = ("linear", "constant", "cosine")
EVAL_SPLITS = ("test", "validation")
#: Written to the output directory and into every checkpoint; resuming compares it.
RUN_CONFIG = "hiftune_run.json"
#: Keys that may differ when resuming (they do not change what the checkpoint means).
RESUMABLE_CHANGES = frozenset(
    {"epochs", "max_steps", "output_dir", "resume", "save_steps", "eval_batch_size", "offload"}
    | {"eval_split", "also_eval", "eval_samples", "zero_shot", "config", "overwrite_output_dir"}
)
#: Keys a resumed run does not take from its checkpoint: where it came from and where it goes (a
#: moved or copied run writes where its checkpoint is now, not where it was written).
NOT_RESUMED = frozenset({"resume", "config", "output_dir", "overwrite_output_dir"})


@dataclass
class TrainRecipeConfig:
    """Everything the training recipe does, as one validated record (also the config-file schema).

    A YAML or JSON config file holds the same keys (see :func:`build_config`). Invalid values
    raise :class:`~hiftune.errors.UserError` (a ``ValueError``) naming the field.

    Attributes:
        model: A preset name (:data:`~hiftune.recipes.models.PRESETS`) or a local Hugging Face
            model directory.
        task: ``prompt-cls``, ``seq-cls`` or ``sft``.
        data: A JSONL or CSV file; ``None`` uses the bundled movie-review sentiment data.
        method: ``hift``, or ``fpft`` (plain full fine-tuning through the same loop).
        optimizer: A name of :data:`~hiftune.engine.optimizers.OPTIMIZERS`.
        resume: A checkpoint (or output directory) to continue; :func:`build_config` takes the
            rest of the configuration from it.
        output_dir: Where the model, the report and checkpoints go (default
            ``runs/<model>-<task>-<method>``; for a resumed run, the checkpoint's directory).
        overwrite_output_dir: Start a new run in an output directory that holds another run
            (its checkpoints, run file and report are removed first); without it that is refused.
        config: The config file the values came from (recorded in the report only).
    """

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "preset or HF model directory"})
    task: str = field(default="prompt-cls", metadata={"help": f"one of {TASKS}"})
    data: str | None = field(default=None, metadata={"help": "JSONL/CSV file (default: bundled)"})
    text_field: str = "text"
    label_field: str = "label"
    prompt_field: str = "prompt"
    response_field: str = "response"
    template: str = DEFAULT_TEMPLATE
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
    overwrite_output_dir: bool = False
    resume: str | None = None
    seed: int = 0
    config: str | None = field(default=None, metadata={"help": "the config file it came from"})

    def __post_init__(self) -> None:
        _numbers_from_text(self)
        for name, allowed in (
            ("task", TASKS),
            ("method", METHODS),
            ("optimizer", tuple(OPTIMIZERS)),
            ("order", ORDERS),
            ("offload", OFFLOADS),
            ("precision", PRECISIONS),
            ("scheduler", SCHEDULERS),
            ("eval_split", EVAL_SPLITS),
        ):
            if getattr(self, name) not in allowed:
                raise UserError(
                    f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}"
                )
        if self.also_eval is not None and (
            self.also_eval not in EVAL_SPLITS or self.also_eval == self.eval_split
        ):
            raise UserError(
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
            raise UserError(f"lr must be a positive number, got {self.lr!r}")
        if not (
            isinstance(self.epochs, (int, float)) and self.epochs > 0 and math.isfinite(self.epochs)
        ):
            raise UserError(f"epochs must be a finite number > 0, got {self.epochs!r}")
        if not (isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio < 1):
            raise UserError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise UserError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm >= 0):
            raise UserError(
                f"max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm!r}"
            )
        if "{text}" not in self.template:
            raise UserError(f"template must contain {{text}}, got {self.template!r}")
        if isinstance(self.label_words, str):
            self.label_words = [w.strip() for w in self.label_words.split(",")]
        if self.label_words is not None and (
            len(self.label_words) < 2 or not all(isinstance(w, str) and w for w in self.label_words)
        ):
            raise UserError(f"label_words must be two or more words, got {self.label_words!r}")
        if self.label_words is not None and self.task != "prompt-cls":
            raise UserError(
                f"label_words is for task prompt-cls only; task {self.task} does not use it"
            )
        if self.method == "fpft" and self.precision == "fp16":
            raise UserError(
                "precision=fp16 is HiFT's mixed precision; for --method fpft use fp32 or bf16"
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON values."""
        return dataclasses.asdict(self)


def _numbers_from_text(cfg: TrainRecipeConfig) -> None:
    """Turns numeric text in numeric fields into numbers (YAML reads ``1e-4`` as a string)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kind = str(f.type)
        if not isinstance(value, str) or not kind.startswith(("int", "float")):
            continue
        try:
            number = float(value)
        except ValueError:
            continue  # left to the field's own check, which names it
        if kind.startswith("int") and number.is_integer():
            setattr(cfg, f.name, int(number))
        elif kind.startswith("float"):
            setattr(cfg, f.name, number)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")


def config_keys() -> frozenset[str]:
    """The names of :class:`TrainRecipeConfig`'s fields: the keys a config may set."""
    return frozenset(f.name for f in dataclasses.fields(TrainRecipeConfig))


def build_config(values: Mapping[str, Any]) -> TrainRecipeConfig:
    """The configuration ``values`` describe: defaults, then a resumed run, a file, then ``values``.

    ``values`` holds explicitly chosen fields only (what a user typed). If it names a checkpoint
    in ``resume``, the run saved with that checkpoint is the base: resuming continues that run,
    and the explicit values may only extend it (more epochs or steps, say; the recipe refuses any
    other difference). If it names a file in ``config``, that file's keys come next.

    Args:
        values: Field name -> value, e.g. ``{"config": "run.yaml", "lr": 0.01}``.

    Raises:
        UserError: For an unknown key, an unreadable config file or checkpoint, or an invalid
            value.
    """
    unknown = sorted(set(values) - config_keys())
    if unknown:
        raise UserError(
            f"unknown option {unknown[0]!r}; allowed: {', '.join(sorted(config_keys()))}"
        )
    merged: dict[str, Any] = {}
    resume = values.get("resume")
    if resume is not None:
        saved = saved_run(find_checkpoint(resume, warn=False))  # the recipe warns
        merged.update({k: v for k, v in saved.get("config", {}).items() if k not in NOT_RESUMED})
    path = values.get("config")
    if path is not None:
        merged.update(read_config_file(Path(path)))
        merged["config"] = str(path)
    merged.update(values)
    return TrainRecipeConfig(**merged)


def saved_run(checkpoint: Path) -> dict[str, Any]:
    """The run file of ``checkpoint`` (or of its output directory): config and identity.

    Raises:
        UserError: If there is none (not a ``hiftune train`` checkpoint) or it is corrupt.
    """
    for candidate in (checkpoint / RUN_CONFIG, checkpoint.parent / RUN_CONFIG):
        if candidate.is_file():
            try:
                run: dict[str, Any] = json.loads(candidate.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{candidate} is corrupt: {e.msg}") from e
            return run
    raise UserError(f"--resume {checkpoint} was not written by hiftune train (no {RUN_CONFIG})")


def read_config_file(path: Path) -> dict[str, Any]:
    """The options in a YAML or JSON config file (``.json`` is JSON, anything else YAML).

    Keys may use dashes or underscores (``units-per-group`` or ``units_per_group``).

    Raises:
        UserError: If the file is missing, cannot be parsed, is not a mapping or has an
            unknown key.
    """
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"cannot parse config file {path}: {first_line(e)}") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value")
    names = config_keys() - {"config"}
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise UserError(f"unknown key {key!r} in {path}; allowed: {', '.join(sorted(names))}")
        out[name] = value
    return out
