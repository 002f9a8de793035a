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

import contextlib
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..engine.config import GROUP_BY, OFFLOADS, ORDERS, PRECISIONS, HiFTConfig
from ..engine.optimizers import METHODS, OPTIMIZERS
from ..errors import UserError, first_line
from .arguments import TRAINING_ARGS, check_training_args, normalize
from .checkpoints import find_checkpoint
from .data import DEFAULT_TEMPLATE
from .models import DEFAULT_MODEL, DTYPES, TASKS
from .schedule import (
    ALWAYS_ACTIVE,
    ALWAYS_ACTIVE_LR_SCALE,
    FALLBACK_UNITS_PER_GROUP,
    NONE,
    STEPS_PER_GROUP,
    UNITS_PER_GROUP,
    parse_always_active,
    parse_units_per_group,
    refuse_for_fpft,
)

#: Learning-rate schedules (``transformers``' ``lr_scheduler_type`` names; HiFT counts them in
#: cycles). Their own options go in ``lr_scheduler_kwargs``.
SCHEDULERS = (
    "linear",
    "constant",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)
#: The bundled data's evaluation splits (a user's data may name any of its own).
EVAL_SPLITS = ("test", "validation")
#: ``train_samples`` / ``eval_samples``: every example (``None`` is the data's own default).
ALL = "all"
DTYPE_NAMES = tuple(DTYPES)
#: Written to the output directory and into every checkpoint; resuming compares it.
RUN_CONFIG = "hiftune_run.json"
#: Keys that may differ when resuming (they do not change what the checkpoint means).
RESUMABLE_CHANGES = frozenset(
    {"epochs", "max_steps", "output_dir", "resume", "save_steps", "eval_batch_size", "offload"}
    | {"eval_split", "also_eval", "eval_samples", "zero_shot", "config", "overwrite_output_dir"}
    # A checkpoint holds the whole HiFT state either way (docs/distributed.md).
    | {"shard_state"}
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
        model: A preset name (:data:`~hiftune.recipes.models.PRESETS`), a local Hugging Face
            model directory, or a Hub id (with ``revision``; ``trust_remote_code`` lets its own
            code run; ``dtype``: ``fp32``, ``bf16``, ``fp16`` or ``auto``, the checkpoint's).
        task: ``prompt-cls``, ``seq-cls`` or ``sft`` (``sft`` takes ``messages``, ShareGPT
            ``conversations``, Alpaca ``instruction``/``output``, ``prompt``/``completion`` or
            plain ``text`` rows; see :mod:`hiftune.recipes.chat`).
        system_prompt: ``sft``: the system message of every conversation, replacing the data's
            (``""``: an empty one, which also keeps a template's default system prompt out).
        chat_template: ``sft``: the chat template to use instead of the tokenizer's, as a file
            path or a Jinja string (saved with the fine-tuned model's tokenizer).
        data: Local JSONL/JSON/CSV/TSV/Parquet/text files (a path, a list or a glob), a
            ``save_to_disk`` directory, a directory of data files, or a Hub dataset id (with
            ``data_config``); ``None`` uses the bundled movie-review sentiment data. See
            :mod:`hiftune.recipes.sources`.
        data_split: The split to train on.
        eval_split: The split to evaluate on; ``None`` takes the data's validation (or test)
            split, else holds out ``eval_fraction`` of the training split (seeded); the bundled
            data's default is ``test``.
        train_samples: A seeded subset of the training split, ``"all"``, or ``None``: the data's
            default (the bundled demo: 1,600; a user's data: all of it). ``eval_samples``
            likewise takes the first N of the evaluation split (the demo: 500).
        method: ``hift``, or ``fpft`` (plain full fine-tuning through the same loop).
        optimizer: A name of :data:`~hiftune.engine.optimizers.OPTIMIZERS`.
        resume: A checkpoint (or output directory) to continue; :func:`build_config` takes the
            rest of the configuration from it.
        output_dir: Where the model, the report and checkpoints go (default
            ``runs/<model>-<task>-<method>``; for a resumed run, the checkpoint's directory).
        overwrite_output_dir: Start a new run in an output directory that holds another run
            (its checkpoints, run file and report are removed first); without it that is refused.
        units_per_group: HiFT's m, or ``"auto"`` (the default): the smallest m from
            :data:`~hiftune.recipes.schedule.FALLBACK_UNITS_PER_GROUP` up whose groups each get
            :data:`~hiftune.recipes.schedule.MIN_UPDATES` updates in the run's steps (see
            :mod:`hiftune.recipes.schedule`).
        always_active: Parameters HiFT trains at every step beside the rotating groups:
            ``"auto"`` (the parameters the checkpoint did not contain, e.g. a new
            classification head, when they are few and untied), ``"none"``, or regexes matched in
            full against parameter names (a list, or one comma-separated string). ``--method
            fpft`` trains every parameter at every step anyway.
        always_active_lr_scale: Factor on the always-active parameters' learning rate.
        steps_per_group: K, consecutive optimizer steps per group before the next one (a cycle
            is k * K steps).
        shard_state: Under ``torchrun`` / ``accelerate launch``, keep each HiFT group's paged
            optimizer state on one rank only (``HiFTConfig.shard_state``; ``precision`` fp32
            only; see docs/distributed.md).
        config: The config file the values came from (recorded in the report only).
        training_args: Any other ``transformers.TrainingArguments`` options, passed through
            (e.g. ``{"gradient_checkpointing": True, "report_to": "tensorboard"}``); see
            :mod:`hiftune.recipes.arguments` for hiftune's names of the others and the options
            the recipe controls itself.
    """

    model: str = field(
        default=DEFAULT_MODEL, metadata={"help": "preset, local HF model directory or Hub id"}
    )
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: str = "fp32"
    task: str = field(default="prompt-cls", metadata={"help": f"one of {TASKS}"})
    data: str | list[str] | None = field(
        default=None, metadata={"help": "files, a glob, a save_to_disk directory or a Hub id"}
    )
    data_config: str | None = None
    data_split: str = "train"
    eval_fraction: float = 0.1
    text_field: str = "text"
    label_field: str = "label"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    response_field: str = "response"
    messages_field: str = "messages"
    system_prompt: str | None = None
    chat_template: str | None = None
    template: str = DEFAULT_TEMPLATE
    label_words: list[str] | None = None
    method: str = "hift"
    optimizer: str = "adamw"
    lr: float = 1e-4
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    units_per_group: int | str = UNITS_PER_GROUP
    # "auto" (the largest block), "none"/None (the paper's units), or a number of parameters.
    max_unit_params: int | str | None = "auto"
    group_by: str = "count"
    order: str = "bottom2up"
    offload: str = "host"
    precision: str = "fp32"
    shard_state: bool = False
    always_active: str | list[str] = ALWAYS_ACTIVE
    always_active_lr_scale: float = ALWAYS_ACTIVE_LR_SCALE
    steps_per_group: int = STEPS_PER_GROUP
    scheduler: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 128
    train_samples: int | str | None = None
    eval_samples: int | str | None = None
    eval_split: str | None = None
    also_eval: str | None = None
    eval_batch_size: int = 32
    zero_shot: bool = True
    save_steps: int | None = None
    output_dir: str | None = None
    overwrite_output_dir: bool = False
    resume: str | None = None
    seed: int = 0
    config: str | None = field(default=None, metadata={"help": "the config file it came from"})
    training_args: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "other transformers TrainingArguments options"}
    )

    def __post_init__(self) -> None:
        _numbers_from_text(self)
        for name, allowed in (
            ("task", TASKS),
            ("method", METHODS),
            ("optimizer", tuple(OPTIMIZERS)),
            ("order", ORDERS),
            ("group_by", GROUP_BY),
            ("offload", OFFLOADS),
            ("precision", PRECISIONS),
            ("scheduler", SCHEDULERS),
            ("dtype", DTYPE_NAMES),
        ):
            if getattr(self, name) not in allowed:
                raise UserError(
                    f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}"
                )
        for name in ("eval_split", "also_eval", "revision", "data_config"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise UserError(f"{name} must be a non-empty name, got {value!r}")
        if self.also_eval is not None and self.also_eval == self.eval_split:
            raise UserError(
                f"also_eval must be another split than eval_split={self.eval_split!r}, "
                f"got {self.also_eval!r}"
            )
        if isinstance(self.data, (list, tuple)):
            if not self.data or not all(isinstance(d, str) and d for d in self.data):
                raise UserError(f"data must be one or more paths, got {self.data!r}")
            self.data = self.data[0] if len(self.data) == 1 else list(self.data)
        elif self.data is not None and not (isinstance(self.data, str) and self.data):
            raise UserError(f"data must be a path, a glob or a Hub dataset id, got {self.data!r}")
        if not (
            isinstance(self.eval_fraction, (int, float)) and 0 < self.eval_fraction < 1
        ) or isinstance(self.eval_fraction, bool):
            raise UserError(f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        self.units_per_group = parse_units_per_group(self.units_per_group)
        for name in (
            "batch_size",
            "grad_accum",
            "max_length",
            "eval_batch_size",
            "steps_per_group",
        ):
            _check_int(name, getattr(self, name), 1)
        self.always_active = parse_always_active(self.always_active)
        scale = self.always_active_lr_scale
        if not _is_number(scale) or not (scale > 0 and math.isfinite(scale)):
            raise UserError(f"always_active_lr_scale must be a number > 0, got {scale!r}")
        for name in ("train_samples", "eval_samples"):
            # None: the data's default (the bundled demo's subset; a user's data whole).
            value = getattr(self, name)
            if isinstance(value, str) and value.strip().lower() in ("all", "none"):
                setattr(self, name, ALL)
            elif value is not None:
                _check_int(name, value, 1)
        for name in ("max_steps", "save_steps"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        _check_int("seed", self.seed, 0)
        self.max_unit_params = _unit_budget(self.max_unit_params)
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
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise UserError(f"system_prompt must be text, got {self.system_prompt!r}")
        if self.chat_template is not None and not (
            isinstance(self.chat_template, str) and self.chat_template.strip()
        ):
            raise UserError(
                f"chat_template must be a file or a Jinja string, got {self.chat_template!r}"
            )
        for name in ("system_prompt", "chat_template"):
            if getattr(self, name) is not None and self.task != "sft":
                raise UserError(f"{name} is for task sft only; task {self.task} does not use it")
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
        if self.shard_state not in (True, False):
            raise UserError(f"shard_state must be true or false, got {self.shard_state!r}")
        if self.shard_state and self.method != "hift":
            raise UserError("shard_state is HiFT's sharded optimizer state; it needs --method hift")
        if self.method == "fpft":
            refuse_for_fpft(self)
        if self.method == "hift":
            try:  # the engine's own checks of the combination (shard_state needs fp32)
                self.hift_config()
            except ValueError as e:
                raise UserError(first_line(e)) from e
        if self.method == "fpft" and self.precision == "fp16":
            raise UserError(
                "precision=fp16 is HiFT's mixed precision; for --method fpft use fp32 or bf16"
            )
        if not isinstance(self.training_args, Mapping):
            raise UserError(f"training_args must be a mapping, got {self.training_args!r}")
        self.training_args = check_training_args(
            self.training_args, method=self.method, optimizer=self.optimizer, own=config_keys()
        )
        if self.warmup_ratio and self.training_args.get("warmup_steps"):
            raise UserError("give warmup_ratio or warmup_steps, not both")

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON values."""
        return dataclasses.asdict(self)

    def hift_config(
        self, *, units_per_group: int | None = None, always_active: Sequence[str] | None = None
    ) -> HiFTConfig:
        """The engine's :class:`~hiftune.engine.config.HiFTConfig` of this run (its HiFT fields).

        The one place the recipe's options become the engine's, for training and for the plan.
        ``"auto"`` options are settled against the loaded model by
        :func:`~hiftune.recipes.schedule.resolve_schedule`, whose values come in here.

        Args:
            units_per_group: m as resolved; default: the configured m (for ``"auto"``,
                :data:`~hiftune.recipes.schedule.FALLBACK_UNITS_PER_GROUP`).
            always_active: The always-active regexes as resolved; default: the configured
                regexes (none for ``"auto"`` and ``"none"``).
        """
        if units_per_group is None:
            configured = self.units_per_group
            units_per_group = (
                configured if isinstance(configured, int) else FALLBACK_UNITS_PER_GROUP
            )
        if always_active is None:
            configured_always = self.always_active
            always_active = configured_always if isinstance(configured_always, list) else ()
        return HiFTConfig(
            units_per_group=units_per_group,
            max_unit_params=self.max_unit_params,  # type: ignore[arg-type]
            group_by=self.group_by,  # type: ignore[arg-type]
            order=self.order,  # type: ignore[arg-type]
            seed=self.seed,
            offload=self.offload,  # type: ignore[arg-type]
            precision=self.precision,  # type: ignore[arg-type]
            shard_state=self.shard_state,
            always_active=tuple(always_active),
            always_active_lr_scale=self.always_active_lr_scale,
            steps_per_group=self.steps_per_group,
        )


def _unit_budget(value: Any) -> int | str | None:
    """``max_unit_params`` as the engine takes it: ``"auto"``, ``None`` or an integer >= 1."""
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("auto", "none"):
            return None if text == "none" else "auto"
        with contextlib.suppress(ValueError):  # else refused below, with the field's name
            value = float(text)  # "30e6" from a command line or YAML
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(
            f"max_unit_params must be auto, none or a number of parameters >= 1, got {value!r}"
        )
    return value


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


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def config_keys() -> frozenset[str]:
    """The names of :class:`TrainRecipeConfig`'s fields: the keys a config may set."""
    return frozenset(f.name for f in dataclasses.fields(TrainRecipeConfig))


def build_config(values: Mapping[str, Any]) -> TrainRecipeConfig:
    """The configuration ``values`` describe: defaults, then a resumed run, a file, then ``values``.

    ``values`` holds explicitly chosen fields only (what a user typed). If it names a checkpoint
    in ``resume``, the run saved with that checkpoint is the base: resuming continues that run,
    and the explicit values may only extend it (more epochs or steps, say; the recipe refuses any
    other difference). If it names a file in ``config``, that file's keys come next.

    Any ``transformers.TrainingArguments`` field is an option too: under hiftune's name if it has
    one (``learning_rate`` is ``lr``; both with different values is an error), else it goes into
    :attr:`TrainRecipeConfig.training_args`, merged option by option across the sources.

    Args:
        values: Field name -> value, e.g. ``{"config": "run.yaml", "lr": 0.01,
            "gradient_checkpointing": True}``.

    Raises:
        UserError: For an unknown key, an unreadable config file or checkpoint, or an invalid
            value.
    """
    explicit = normalize(values, config_keys(), "the options given")
    merged: dict[str, Any] = {}
    resume = explicit.get("resume")
    if resume is not None:
        saved = saved_run(find_checkpoint(resume, warn=False))  # the recipe warns
        previous = saved.get("config", {})
        if "always_active" not in previous:  # saved before it existed: no always-active unit
            merged["always_active"] = NONE
        _merge(merged, {k: v for k, v in previous.items() if k not in NOT_RESUMED})
    path = explicit.get("config")
    if path is not None:
        _merge(merged, read_config_file(Path(path)))
        merged["config"] = str(path)
    _merge(merged, explicit)
    return TrainRecipeConfig(**merged)


def _merge(into: dict[str, Any], values: Mapping[str, Any]) -> None:
    """``into.update(values)``, but pass-through options are merged one by one."""
    for key, value in values.items():
        if key == TRAINING_ARGS and isinstance(value, Mapping):
            into[key] = {**into.get(key, {}), **value}
        else:
            into[key] = value


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

    Keys may use dashes or underscores (``units-per-group`` or ``units_per_group``), and may be
    ``transformers.TrainingArguments`` fields (see :func:`build_config`).

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
    if "config" in raw:
        raise UserError(f"config file {path} cannot name another config file")
    return normalize(raw, config_keys() - {"config"}, str(path))
