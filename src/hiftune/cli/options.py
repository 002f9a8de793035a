"""Options more than one sub-command has: one definition, so one name, meaning and default each.

``hiftune train``, ``estimate`` and ``inspect`` name a model the same way (:func:`add_hub_arguments`,
:func:`model_config`) and take the same HiFT schedule options with the same defaults
(:func:`add_schedule_arguments`, from :mod:`hiftune.recipes.schedule`). ``train`` settles ``auto``
against the loaded checkpoint and the run's steps; the memory tools have neither, and
:func:`memory_schedule` settles it as ``train`` does without them, saying so.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from torch import nn

from ..engine.config import GROUP_BY, HiFTConfig
from ..errors import UserError
from ..memory.configs import CONFIGS, TASK_HEADS, new_head_parameters, resolve_config
from ..recipes.schedule import (
    ALWAYS_ACTIVE,
    ALWAYS_ACTIVE_LR_SCALE,
    AUTO,
    FALLBACK_UNITS_PER_GROUP,
    MIN_UPDATES,
    STEPS_PER_GROUP,
    UNITS_PER_GROUP,
    parse_always_active,
    resolve_always_active,
    resolve_schedule,
)
from .types import positive_int, unit_budget, units_per_group


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model of the memory tools (``estimate``, ``inspect``): named as ``train`` names it."""
    from ..recipes.models import PRESETS

    presets = ", ".join(dict.fromkeys([*PRESETS, *CONFIGS]))
    parser.add_argument(
        "model",
        metavar="MODEL",
        help=f"a preset ({presets}), a Hugging Face model directory or config.json, or a Hugging "
        "Face Hub id as hiftune train takes it (its config.json only: from the cache under "
        "HF_HOME, downloaded unless HF_HUB_OFFLINE=1)",
    )
    add_hub_arguments(parser, defaults=True)
    parser.add_argument(
        "--task",
        choices=tuple(TASK_HEADS),
        default="causal-lm",
        help="what the model is trained for: causal-lm, prompt-cls and sft build a causal LM "
        "with its LM head (the names of hiftune train), seq-cls a classification head; "
        "seq2seq-lm (T5, BART), speech-seq2seq (Whisper), image-cls (ViT), ctc (wav2vec2) and "
        "image-text-to-text (LLaVA) the transformers auto class of that head (default causal-lm)",
    )


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """How the model is split into units and groups (beyond m): the unit budget and balancing."""
    parser.add_argument(
        "--max-unit-params",
        type=unit_budget,
        default="auto",
        help="size budget of a unit in parameters: larger units are split (a block into its "
        "modules, a vocabulary matrix into row shards). auto = the largest block (default); "
        "none = never split (the paper's units)",
    )
    parser.add_argument(
        "--group-by",
        choices=GROUP_BY,
        default="count",
        help="count: m units per group (default); size: the same number of groups, balanced by "
        "parameters",
    )


def add_hub_arguments(group: Any, *, defaults: bool) -> None:
    """``--revision`` and ``--trust-remote-code``: how a Hub id is read.

    Args:
        group: A parser or argument group.
        defaults: Put the defaults in the namespace; ``False`` leaves unset options out of it
            (``hiftune train``, whose config file must not be overridden by defaults).
    """
    group.add_argument(
        "--revision",
        default=None if defaults else argparse.SUPPRESS,
        help="Hub model revision: branch, tag or commit",
    )
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=False if defaults else argparse.SUPPRESS,
        help="let a Hub model run its own modelling code",
    )


def add_schedule_arguments(group: Any, *, defaults: bool) -> None:
    """``--units-per-group`` (``-m``), ``--steps-per-group`` and ``--always-active``.

    Args:
        group: A parser or argument group.
        defaults: As for :func:`add_hub_arguments`.
    """

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    group.add_argument(
        "--units-per-group",
        "-m",
        type=units_per_group,
        default=default(UNITS_PER_GROUP),
        help=f"m, units trained together; auto: the smallest m from {FALLBACK_UNITS_PER_GROUP} "
        f"up whose groups each get {MIN_UPDATES} updates in the run's steps (m="
        f"{FALLBACK_UNITS_PER_GROUP} where they are not known) (default {UNITS_PER_GROUP})",
    )
    group.add_argument(
        "--steps-per-group",
        type=positive_int,
        default=default(STEPS_PER_GROUP),
        help="K, optimizer steps each group takes before the next one; a cycle is k x K steps "
        f"(default {STEPS_PER_GROUP})",
    )
    group.add_argument(
        "--always-active",
        default=default(ALWAYS_ACTIVE),
        help="parameters trained at every step beside the groups: auto = those the checkpoint "
        "did not have (a new classification head) if small and untied; none; or "
        f"comma-separated regexes of parameter names, matched in full (default {ALWAYS_ACTIVE})",
    )


def model_config(args: argparse.Namespace) -> Any:
    """The ``transformers`` config of ``args.model``: a preset, a path, or a Hub id.

    ``hiftune train``'s own presets (:data:`hiftune.recipes.models.PRESETS`) are found where
    ``train`` finds them; everything else as :func:`hiftune.memory.configs.resolve_config` reads
    it (a Hub id through the cache, as ``train`` reads it). No weights are read.

    Raises:
        UserError: If the model cannot be found.
    """
    from ..recipes.models import PRESETS, resolve_model

    name = args.model
    if name in PRESETS and name not in CONFIGS:  # a model shipped in a package: its directory
        name = resolve_model(name).location
    return resolve_config(name, args.revision, args.trust_remote_code)


@dataclass
class MemorySchedule:
    """The schedule options settled for a model built from a config (no checkpoint, no steps).

    Attributes:
        units_per_group: m.
        steps_per_group: K.
        always_active: Regexes of the always-active parameters (for the engine).
        always_active_names: The parameters they name.
        notes: What was assumed, one line each (``auto`` without a step count, say).
    """

    units_per_group: int
    steps_per_group: int
    always_active: tuple[str, ...] = ()
    always_active_names: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values."""
        return {
            "units_per_group": self.units_per_group,
            "steps_per_group": self.steps_per_group,
            "always_active": list(self.always_active_names),
            "notes": list(self.notes),
        }


def memory_schedule(model: nn.Module, args: argparse.Namespace) -> MemorySchedule:
    """Settles ``args``' schedule options for ``model`` as ``hiftune train`` would.

    ``--units-per-group auto`` needs the run's number of optimizer steps, which the memory
    tools do not know: it is ``train``'s fallback for that case, and a note says so.
    ``--always-active auto`` takes the parameters a pretrained checkpoint would lack (a new
    classification head, :func:`~hiftune.memory.configs.new_head_parameters`).

    Raises:
        UserError: For an ``--always-active`` regex that is invalid or matches nothing.
    """
    setting = parse_always_active(args.always_active)
    always = resolve_always_active(model, setting, new_head_parameters(model, args.task))
    # The recipe's own resolution, with what it would know before counting the run's steps.
    cfg = SimpleNamespace(
        method="hift",
        units_per_group=args.units_per_group,
        steps_per_group=args.steps_per_group,
        always_active_lr_scale=ALWAYS_ACTIVE_LR_SCALE,
    )
    settled = resolve_schedule(cfg, always=always)
    notes = []
    if args.units_per_group == AUTO:
        notes.append(
            f"m={settled.units_per_group}: auto without the run's number of steps, as hiftune "
            f"train falls back to then (it picks the smallest m from {FALLBACK_UNITS_PER_GROUP} "
            f"up whose groups each get {MIN_UPDATES} updates in the run's steps)"
        )
    if always.names:
        how = "auto: a new head" if setting == "auto" else "--always-active"
        notes.append(f"always active ({how}): {', '.join(always.names)}")
    notes += settled.notes
    return MemorySchedule(
        settled.units_per_group,
        settled.steps_per_group,
        settled.always_active,
        settled.always_active_names,
        notes,
    )


def split_config(args: argparse.Namespace, schedule: MemorySchedule | None = None) -> HiFTConfig:
    """The :class:`HiFTConfig` of the split options (and the settled schedule, if given).

    Raises:
        UserError: For a value the engine refuses, as one line.
    """
    try:
        return HiFTConfig(
            units_per_group=schedule.units_per_group if schedule else 1,
            steps_per_group=schedule.steps_per_group if schedule else 1,
            always_active=schedule.always_active if schedule else (),
            max_unit_params=args.max_unit_params,
            group_by=args.group_by,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
