"""The configurations the benchmark measures: one row each in the tables.

``dtype`` is the precision the model's weights are built (or loaded) in before the method sees
them: ``bf16`` for methods whose authors train a half-precision model (BAdam, LOMO, GaLore,
APOLLO, 8-bit AdamW, LoRA's frozen base) and for HiFT's mixed^Hi (fp32 masters only for the
active group); ``fp32`` for full fine-tuning, which in its "bf16" form is autocast over fp32
weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Method:
    """One configuration.

    Attributes:
        name: Short id used on the command line and in JSON.
        family: Adapter module (see :data:`bench.adapters.FAMILIES`).
        label: How the tables name it.
        package: The PyPI distribution the method comes from (its version goes in the report).
        dtype: ``"fp32"`` or ``"bf16"``: the weights' precision when the method receives them.
        options: Keyword arguments of the adapter's ``build``.
        adam_quality: Whether it keeps Adam-quality updates for every trained weight (the issue's
            goal compares hiftune with these); ``None`` for the baseline and hiftune itself.
        cyclic: Whether steps differ by which block is active, so timing covers one full cycle.
        note: What is unusual about the configuration (shown under the table).
    """

    name: str
    family: str
    label: str
    package: str
    dtype: str = "fp32"
    options: dict[str, Any] = field(default_factory=dict)
    adam_quality: bool | None = True
    cyclic: bool = False
    note: str = ""


#: Units per group of hiftune's quality runs (``hiftune train``'s default; docs/quality.md),
#: and of the memory row measured at that split.
QUALITY_UNITS_PER_GROUP = 4

METHODS: tuple[Method, ...] = (
    Method("fpft-fp32", "full", "full FT, AdamW fp32", "torch", adam_quality=None),
    Method(
        "fpft-bf16",
        "full",
        "full FT, AdamW bf16 autocast",
        "torch",
        options={"autocast": True},
        adam_quality=None,
    ),
    Method(
        "hift-fp32-host",
        "hift",
        "hiftune fp32, host paging",
        "hiftune",
        options={"offload": "host"},
        adam_quality=None,
        cyclic=True,
    ),
    Method(
        "hift-fp32-disk",
        "hift",
        "hiftune fp32, disk paging",
        "hiftune",
        options={"offload": "disk"},
        adam_quality=None,
        cyclic=True,
    ),
    Method(
        "hift-bf16-host",
        "hift",
        "hiftune bf16 mixed^Hi, host paging",
        "hiftune",
        dtype="bf16",
        options={"offload": "host", "precision": "bf16"},
        adam_quality=None,
        cyclic=True,
    ),
    Method(
        "hift-bf16-disk",
        "hift",
        "hiftune bf16 mixed^Hi, disk paging",
        "hiftune",
        dtype="bf16",
        options={"offload": "disk", "precision": "bf16"},
        adam_quality=None,
        cyclic=True,
    ),
    Method(
        "hift-bf16-disk-m4",
        "hift",
        f"hiftune bf16 mixed^Hi, disk paging, {QUALITY_UNITS_PER_GROUP} units per group",
        "hiftune",
        dtype="bf16",
        options={
            "offload": "disk",
            "precision": "bf16",
            "units_per_group": QUALITY_UNITS_PER_GROUP,
        },
        adam_quality=None,
        cyclic=True,
        note=(
            "hiftune's rows train one unit per group (its smallest peak), except the one with "
            f"{QUALITY_UNITS_PER_GROUP} units per group: the split of the quality runs below "
            "(`hiftune train`'s default)."
        ),
    ),
    Method(
        "lora-r8",
        "lora",
        "LoRA r8, all linear (bf16 base)",
        "peft",
        dtype="bf16",
        options={"rank": 8},
        adam_quality=False,
    ),
    Method(
        "lora-r64",
        "lora",
        "LoRA r64, all linear (bf16 base)",
        "peft",
        dtype="bf16",
        options={"rank": 64},
        adam_quality=False,
    ),
    Method(
        "badam",
        "badam",
        "BAdam, defaults (no embedding/head)",
        "badam",
        dtype="bf16",
        cyclic=True,
        note="BAdam's defaults train only the transformer blocks: embedding and LM head stay frozen.",
    ),
    Method(
        "badam-all",
        "badam",
        "BAdam + embedding + LM head",
        "badam",
        dtype="bf16",
        options={"include_embedding": True, "include_lm_head": True},
        cyclic=True,
    ),
    Method("lomo", "lomo", "LOMO (fused SGD)", "lomo-optim", dtype="bf16", adam_quality=False),
    Method("galore", "galore", "GaLore AdamW r128", "galore-torch", dtype="bf16"),
    Method("adam-mini", "adam_mini", "Adam-mini", "adam-mini", dtype="bf16"),
    Method("apollo", "apollo", "APOLLO r256", "apollo-torch", dtype="bf16"),
    Method(
        "apollo-mini",
        "apollo",
        "APOLLO-Mini (r1)",
        "apollo-torch",
        dtype="bf16",
        options={"rank": 1, "scale_type": "tensor", "scale": 128.0},
    ),
    Method("adamw-8bit", "bnb", "8-bit AdamW (bitsandbytes)", "bitsandbytes", dtype="bf16"),
)

#: The rows of the quality plan (``bench.quality_plan``). hiftune's train at ``hiftune train``'s
#: precision and paging (fp32, host; read from ``TrainRecipeConfig``), so that they differ only
#: in the schedule options; ``bench.quality_plan.resolve_options`` turns the symbolic options
#: (``head``, ``units_per_group="fewer"``, ``defaults``) into the adapter's keyword arguments
#: for each task and budget.
QUALITY: tuple[Method, ...] = (
    Method("fpft", "full", "full FT, AdamW fp32", "torch", adam_quality=None),
    Method(
        "badam-rec",
        "badam",
        "BAdam, authors' settings (K=50, new head active)",
        "badam",
        dtype="bf16",
        options={"switch_block_every": 50},
        cyclic=True,
    ),
    Method(
        "hift-a",
        "hift",
        "hiftune (a) paper: m=4, K=1",
        "hiftune",
        options={"units_per_group": 4},
        adam_quality=None,
    ),
    Method(
        "hift-b",
        "hift",
        "hiftune (b) new head always active, lr x3",
        "hiftune",
        options={"units_per_group": 4, "head": True, "always_active_lr_scale": 3.0},
        adam_quality=None,
    ),
    Method(
        "hift-c",
        "hift",
        "hiftune (c) = (b), fewer groups (>= 8 updates each)",
        "hiftune",
        options={"units_per_group": "fewer", "head": True, "always_active_lr_scale": 3.0},
        adam_quality=None,
    ),
    Method(
        "hift-d",
        "hift",
        "hiftune (d) = (c), K=4 steps per group",
        "hiftune",
        options={
            "units_per_group": "fewer",
            "head": True,
            "always_active_lr_scale": 3.0,
            "steps_per_group": 4,
        },
        adam_quality=None,
    ),
    Method(
        "hift-e",
        "hift",
        "hiftune (e) = (b), 2 groups (m=8)",
        "hiftune",
        options={"units_per_group": 8, "head": True, "always_active_lr_scale": 3.0},
        adam_quality=None,
    ),
    Method(
        "hift-defaults",
        "hift",
        "hiftune defaults (hiftune train)",
        "hiftune",
        options={"defaults": True},
        adam_quality=None,
    ),
)

BY_NAME = {m.name: m for m in (*METHODS, *QUALITY)}

#: The configurations of ``make bench-quick`` at batch 4 (all of them run at batch 1).
QUICK_B4 = ("fpft-fp32", "fpft-bf16", "hift-bf16-disk", "lora-r8", "badam", "lomo", "adamw-8bit")


def get(name: str) -> Method:
    """The method called ``name``.

    Raises:
        ValueError: For an unknown name (the message lists the known ones).
    """
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; one of {', '.join(BY_NAME)}") from None
