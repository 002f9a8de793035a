"""``hiftune profile``: argument parsing, then a call into :mod:`hiftune.memory.profile`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from ..engine.config import PRECISIONS
from ..engine.optimizers import METHODS, OPTIMIZERS
from ..memory.profile import (
    PROFILE_OFFLOADS,
    PROFILE_TASKS,
    TIMINGS,
    RunSpec,
    build_specs,
    default_device,
    default_offloads,
    profile,
)
from ..memory.profile_report import render_table, write_outputs
from .options import add_split_arguments
from .types import comma_list, positive_int

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``hiftune profile`` options to ``parser``."""
    parser.add_argument("model", help="a preset name or a Hugging Face config.json file or dir")
    parser.add_argument("--task", default="causal-lm", choices=PROFILE_TASKS)
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--seq-len", type=positive_int, default=128)
    parser.add_argument(
        "--optimizer",
        default="adamw",
        choices=tuple(OPTIMIZERS),
        help="the same optimizers as hiftune train and estimate (adafactor: transformers' "
        "Adafactor with relative_step=False)",
    )
    parser.add_argument("--units-per-group", type=positive_int, default=1, help="HiFT's m")
    add_split_arguments(parser)
    parser.add_argument(
        "--offload",
        type=comma_list(),
        default=None,
        help=f"HiFT offload(s), comma-separated, of {', '.join(PROFILE_OFFLOADS)} (discard throws "
        "inactive state away: the floor of paging). Default: disk on CPU (where host memory is "
        "the device), host on CUDA.",
    )
    parser.add_argument(
        "--precision",
        type=comma_list(),
        default=["fp32"],
        help=f"HiFT precision(s), comma-separated, of {', '.join(PRECISIONS)} "
        "(FPFT always runs fp32)",
    )
    parser.add_argument(
        "--methods",
        type=comma_list(),
        default=list(METHODS),
        help=f"which of {','.join(METHODS)} to run (FPFT runs first)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="timed steps (default: one HiFT cycle)"
    )
    parser.add_argument(
        "--fpft-steps", type=positive_int, default=None, help="timed FPFT steps (default: --steps)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps first (default: one HiFT cycle for HiFT, 1 for FPFT)",
    )
    parser.add_argument(
        "--timing",
        default="separate",
        choices=TIMINGS,
        help="separate (default): time extra steps under glibc's usual malloc settings; shared: "
        "time the memory steps (faster, but every freed tensor is returned to the kernel)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch threads per worker (default: torch's default, one per core)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--offload-dir", default=None, help="directory for disk paging")
    parser.add_argument(
        "--output-dir", default=None, help="write <name>.md, <name>.json and <name>.png here"
    )
    parser.add_argument("--name", default="profile", help="file name stem in --output-dir")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Runs ``hiftune profile``: every configuration in its own subprocess, then the report."""
    from tqdm.auto import tqdm

    device = args.device or default_device()
    offloads = args.offload or default_offloads(device)
    specs = build_specs(
        args.model,
        methods=args.methods,
        offloads=offloads,
        precisions=args.precision,
        steps=args.steps,
        fpft_steps=args.fpft_steps,
        warmup=args.warmup,
        task=args.task,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        optimizer=args.optimizer,
        units_per_group=args.units_per_group,
        max_unit_params=args.max_unit_params,
        group_by=args.group_by,
        seed=args.seed,
        device=device,
        offload_dir=args.offload_dir,
        timing=args.timing,
        threads=args.threads,
    )
    command = _command_line(args, specs, offloads)
    total = sum(s.warmup + s.steps * (2 if s.timing == "separate" else 1) for s in specs)
    done: dict[RunSpec, int] = {}
    with tqdm(total=total, unit="step", disable=args.no_progress, file=sys.stderr) as bar:

        def on_step(spec: RunSpec, n: int) -> None:
            bar.set_description(spec.label)
            bar.update(n - done.get(spec, 0))
            done[spec] = n

        try:
            result = profile(specs, on_step)
        except RuntimeError as e:  # a worker failed: its stderr tail is in the message
            logger.error("%s", e)
            return 1

    paths = write_outputs(result, args.output_dir, args.name, command) if args.output_dir else {}
    if args.json:
        print(json.dumps({"command": command, **result}, indent=2, default=str))
    else:
        print(render_table(result), end="")
        for kind, path in paths.items():
            print(f"{kind}: {path}")
    return 0


def _command_line(
    args: argparse.Namespace, specs: Sequence[RunSpec], offloads: Sequence[str]
) -> str:
    """The command that reproduces this run, every measured option spelled out."""
    methods = dict.fromkeys(s.method for s in specs)  # in the order they run: FPFT first
    parts = [
        "hiftune profile",
        args.model,
        f"--task {args.task}",
        f"--batch-size {args.batch_size}",
        f"--seq-len {args.seq_len}",
        f"--optimizer {args.optimizer}",
        f"--units-per-group {args.units_per_group}",
        f"--max-unit-params {str(args.max_unit_params).lower()}",
        f"--group-by {args.group_by}",
        f"--methods {','.join(methods)}",
        f"--offload {','.join(offloads)}",
        f"--precision {','.join(args.precision)}",
        f"--timing {args.timing}",
    ]
    for flag, value in (
        ("--steps", args.steps),
        ("--fpft-steps", args.fpft_steps),
        ("--warmup", args.warmup),
        ("--device", args.device),
        ("--threads", args.threads),
    ):
        if value is not None:
            parts.append(f"{flag} {value}")
    if args.seed:
        parts.append(f"--seed {args.seed}")
    return " ".join(parts)
