"""``hiftune inspect``: argument parsing, a call into :mod:`hiftune.memory.inspect`, printing."""

from __future__ import annotations

import argparse
import json

from ..engine.config import ORDERS, PRECISIONS
from ..memory.configs import head_of
from ..memory.estimate import build_meta_model
from ..memory.inspect import Inspection, inspect_split
from ..memory.render import markdown_table
from .options import (
    add_model_arguments,
    add_schedule_arguments,
    add_split_arguments,
    memory_schedule,
    model_config,
    split_config,
)
from .types import positive_int

MiB = 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the arguments of ``hiftune inspect``."""
    add_model_arguments(parser)
    parser.add_argument(
        "--num-labels",
        type=positive_int,
        default=2,
        help="classes of the seq-cls or image-cls head (default 2)",
    )
    add_schedule_arguments(parser, defaults=True)
    add_split_arguments(parser)
    parser.add_argument(
        "--order", choices=ORDERS, default="bottom2up", help="training order (default bottom2up)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random order")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="dtype of the weights the byte counts assume (default fp32)",
    )
    parser.add_argument(
        "--no-grad-check",
        dest="check_gradients",
        action="store_false",
        help="skip the dummy forward pass per group that finds parameters getting no gradient",
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    """Runs ``hiftune inspect``: prints the split (or JSON) to stdout."""
    model = build_meta_model(model_config(args), args.task, args.num_labels)
    schedule = memory_schedule(model, args)
    result = inspect_split(
        model,
        name=args.model,
        units_per_group=schedule.units_per_group,
        order=args.order,
        seed=args.seed,
        precision=args.precision,
        config=split_config(args, schedule),
        head=head_of(args.task),
        check_gradients=args.check_gradients,
    )
    if args.json:
        print(json.dumps({**result.to_dict(), "schedule": schedule.to_dict()}, indent=2))
    else:
        text = render(result, task=args.task, cls=type(model).__name__)
        print(text + "".join(f"Note: {n}\n" for n in schedule.notes), end="")
    return 0


def _size(params: int, nbytes: int) -> dict[str, str]:
    return {"params": f"{params / 1e6:,.3f}M", "MiB": f"{nbytes / MiB:,.2f}"}


def render(result: Inspection, *, task: str, cls: str) -> str:
    """The inspection as text: a title, the groups in training order, tied/shared, warnings."""
    lines = [
        f"{result.model} ({cls}, {task}): {result.params / 1e6:,.2f}M parameters, "
        f"{result.trainable_params / 1e6:,.2f}M trainable in {len(result.units)} units, "
        f"{len(result.groups)} groups of m={result.units_per_group}, order {result.order}; "
        f"bytes of {result.precision} weights ({result.bytes_per_param} per parameter)",
        "",
    ]
    units = {u.name: u for u in result.units}
    rows = []
    for g in result.groups:
        for j, name in enumerate(g.units):
            u = units[name]
            rows.append(
                {
                    "step": g.step if j == 0 else "",
                    "group": g.name if j == 0 else "",
                    "unit": name,
                    "block module": u.module or "",
                    "tensors": u.tensors,
                    **_size(u.params, u.bytes),
                    "group params": f"{g.params / 1e6:,.3f}M" if j == 0 else "",
                    "peak": "<- peak" if j == 0 and g.name == result.peak_group else "",
                }
            )
    lines.append(markdown_table(rows))
    peak = next(g for g in result.groups if g.name == result.peak_group)
    median = result.median_block_params
    lines.append(
        f"Peak group: {peak.name}, {peak.params / 1e6:,.3f}M trainable parameters, "
        f"{peak.bytes / MiB:,.2f} MiB of weights"
        + (f"; median block {median / 1e6:,.3f}M" if median else "")
    )
    for names in result.tied:
        lines.append(f"Tied (one tensor): {' = '.join(names)}")
    for name, users in result.shared.items():
        lines.append(f"Shared: {name} is used by {', '.join(users)}")
    lines += [f"WARNING: {w}" for w in result.warnings] or ["No warnings."]
    return "\n".join(lines) + "\n"
