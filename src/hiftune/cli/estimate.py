"""``hiftune estimate``: argument parsing, then a call into :mod:`hiftune.memory.estimate`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from ..engine.config import OFFLOADS, PRECISIONS
from ..engine.optimizers import OPTIMIZERS
from ..errors import UserError
from ..memory.distributed import DISTRIBUTED_MODES, RankEstimate, estimate_per_rank
from ..memory.estimate import DEFAULT_PRECISIONS, HIFT_MIXED, build_meta_model, estimate, render
from ..memory.fit import CHECKPOINTING, PAGING, PRECISION, SMALLER_BATCH, Plan, fit
from ..memory.render import markdown_table
from .options import (
    MemorySchedule,
    add_model_arguments,
    add_schedule_arguments,
    add_split_arguments,
    memory_schedule,
    model_config,
    split_config,
)
from .types import comma_list, positive_float, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the arguments of ``hiftune estimate``."""
    add_model_arguments(parser)
    parser.add_argument(
        "--num-labels",
        type=int,
        default=2,
        help="classes of the seq-cls or image-cls head (default 2)",
    )
    add_schedule_arguments(parser, defaults=True)
    add_split_arguments(parser)
    parser.add_argument(
        "--optimizer",
        type=comma_list(None),
        action="extend",
        help=f"only these optimizers, comma-separated: {', '.join(OPTIMIZERS)} or a dotted "
        "class path such as torch.optim.RMSprop (default: all named ones)",
    )
    parser.add_argument(
        "--precision",
        type=comma_list(PRECISIONS),
        action="extend",
        help=f"precisions, comma-separated, of {', '.join(PRECISIONS)} (default "
        f"{','.join(DEFAULT_PRECISIONS)}; fp16 needs the same memory as bf16). For FPFT, "
        "bf16/fp16 is standard mixed precision (mode 'mixed': fp32 masters of every weight + "
        "half weights); for HiFT it is hierarchical mixed precision (mode 'mixed^Hi': half "
        "weights, fp32 masters of the active group only), as hiftune train/profile run it",
    )
    parser.add_argument(
        "--hift-mixed",
        choices=HIFT_MIXED,
        default="hi",
        help="the mode of HiFT's bf16/fp16 rows: hi = mixed^Hi (default), standard = 'mixed' "
        "like FPFT (the paper's 'HiFT mixed' rows), both = both rows (every row of the paper's "
        "memory table)",
    )
    parser.add_argument(
        "--batch-size", type=int, help="with --seq-len: also estimate saved activations"
    )
    parser.add_argument("--seq-len", type=int, help="with --batch-size: sequence length")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="count activations as hiftune train --gradient-checkpointing keeps them: every "
        "block's input plus one block's recomputed tensors",
    )
    parser.add_argument(
        "--offload",
        choices=OFFLOADS,
        default="host",
        help="where HiFT keeps inactive groups' optimizer state and fp32 masters, as hiftune "
        "train --offload: none = on the device, host = host memory, disk = files (default host)",
    )
    parser.add_argument(
        "--fit",
        type=positive_float,
        metavar="DEVICE_GIB",
        help="search precision, offload, m, gradient checkpointing and batch size (the given one, "
        "then smaller) for the fastest HiFT plan whose device memory is at most DEVICE_GIB; "
        "print it, or the least it would need and exit 1 (needs --batch-size and --seq-len; "
        "--precision, --offload, -m and --gradient-checkpointing are searched, not read)",
    )
    parser.add_argument(
        "--host-memory",
        type=positive_float,
        metavar="GIB",
        help="with --fit: host memory available for paged state (default: no limit)",
    )
    parser.add_argument(
        "--processes",
        type=positive_int,
        help="also predict HiFT's memory per rank on this many processes (docs/distributed.md)",
    )
    parser.add_argument(
        "--mode",
        choices=DISTRIBUTED_MODES,
        default="dp",
        help="with --processes: dp = data parallel (every rank pages every group's state), "
        "sharded = each rank keeps its share of the state (HiFTConfig.shard_state), fsdp2 = "
        "blocks sharded with FSDP2 (default dp)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the rows as a JSON list (with --processes: an object with 'rows' and "
        "'per_rank')",
    )


def run(args: argparse.Namespace) -> int:
    """Runs ``hiftune estimate``: prints a table (or JSON) to stdout; with ``--fit``, 1 when
    nothing fits."""
    model = build_meta_model(model_config(args), args.task, args.num_labels)
    if args.fit is not None or args.host_memory is not None:
        return _fit(model, args)
    schedule = memory_schedule(model, args)
    rows = estimate(
        model,
        units_per_group=schedule.units_per_group,
        optimizers=args.optimizer,
        precisions=args.precision,
        hift_mixed=args.hift_mixed,
        config=split_config(args, schedule),
        task=args.task,
        num_labels=args.num_labels,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        gradient_checkpointing=args.gradient_checkpointing,
        offload=args.offload,
    )
    combos = sorted({(r.optimizer, r.precision) for r in rows})
    per_rank = _per_rank(model, args, combos, schedule)
    if args.json:
        for note in schedule.notes:  # stdout stays one JSON document
            print(f"note: {note}", file=sys.stderr)
        if per_rank is None:
            print(json.dumps([r.to_dict() for r in rows], indent=2))
        else:
            rank_rows = [dataclasses.asdict(r) for r in per_rank]
            print(
                json.dumps({"rows": [r.to_dict() for r in rows], "per_rank": rank_rows}, indent=2)
            )
        return 0
    params = sum(p.numel() for p in model.parameters())
    text = render(
        rows,
        model=args.model,
        task=args.task,
        params=params,
        units_per_group=schedule.units_per_group,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        offload=args.offload,
    )
    print(text, end="")
    for note in schedule.notes:
        print(f"Note: {note}")
    if per_rank is not None:
        half_left_out = args.mode == "sharded" and any(p != "fp32" for _, p in combos)
        print(_render_per_rank(per_rank, args.processes, args.mode, half_left_out), end="")
    return 0


def _per_rank(
    model: object,
    args: argparse.Namespace,
    combos: list[tuple[str, str]],
    schedule: MemorySchedule,
) -> list[RankEstimate] | None:
    """The busiest rank per optimizer and precision, or ``None`` without ``--processes``."""
    if args.processes is None:
        return None
    out = []
    for optimizer, precision in combos:
        if args.mode == "sharded" and precision != "fp32":
            continue  # sharded state trains in fp32 only; said under the table
        ranks = estimate_per_rank(
            model,
            processes=args.processes,
            mode=args.mode,
            optimizer=optimizer,
            precision=precision,
            units_per_group=schedule.units_per_group,
            config=split_config(args, schedule),
        )
        out.append(max(ranks, key=lambda r: r.total_mib))
    return out


def _render_per_rank(
    rows: list[RankEstimate], processes: int, mode: str, half_left_out: bool
) -> str:
    table = [
        {
            "optimizer": r.optimizer,
            "precision": r.precision,
            "busiest rank": r.rank,
            "peak group": r.group,
            "device weights MiB": r.device_weights_mib,
            "device grads MiB": r.device_grads_mib,
            "device states MiB": r.device_states_mib,
            "device GiB": r.device_mib / 1024,
            "paged GiB": r.paged_mib / 1024,
            "total GiB": r.total_mib / 1024,
            "sent MiB/step": r.comm_mib_per_step,
        }
        for r in rows
    ]
    lines = [
        "",
        f"HiFT per rank on {processes} process(es), mode {mode} (docs/distributed.md); the "
        "busiest rank; device = weights + gradients + optimizer state on the accelerator, paged = "
        "the other groups' state and fp32 masters on host or disk; activations not included.",
        "",
        markdown_table(table) if table else "(no rows: sharded state trains in fp32 only)",
    ]
    if half_left_out:
        lines.append("sharded state trains in fp32 only: half-precision rows left out")
    return "\n".join(lines) + "\n"


def _fit(model: Any, args: argparse.Namespace) -> int:
    """``--fit``: the fastest plan that fits, or the least it would need (exit 1)."""
    if args.fit is None:
        raise UserError("--host-memory goes with --fit DEVICE_GIB")
    if args.batch_size is None or args.seq_len is None:
        raise UserError("--fit needs --batch-size and --seq-len (activations decide the fit)")
    if args.optimizer is not None and len(args.optimizer) != 1:
        raise UserError("--fit plans for one optimizer; give one --optimizer (default adamw)")
    optimizer = args.optimizer[0] if args.optimizer else "adamw"
    schedule = memory_schedule(model, args)
    answer = fit(
        model,
        device_gib=args.fit,
        host_gib=args.host_memory,
        optimizer=optimizer,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        config=split_config(args, schedule),
        task=args.task,
        num_labels=args.num_labels,
    )
    if args.json:
        print(json.dumps(answer.to_dict(), indent=2))
        return 0 if answer.plan else 1
    host = "no host limit" if args.host_memory is None else f"{args.host_memory:g} GiB host"
    print(
        f"{args.model} ({args.task}), HiFT with {optimizer}, batch {args.batch_size} x "
        f"{args.seq_len}: fit in {args.fit:g} GiB device, {host}.\n"
    )
    named = [("fits", answer.plan), ("fastest, ignoring the limits", answer.fastest)]
    if answer.least is not None:
        named[0] = ("least it would need", answer.least)
    print(markdown_table([_plan_line(name, p) for name, p in named if p is not None]))
    if answer.least is not None:
        print(
            f"Nothing fits: the plan needing the least device memory needs "
            f"{answer.least.device_gib:.2f} GiB device, {answer.least.host_gib:.2f} GiB host."
        )
    if answer.plan is not None:
        p = answer.plan
        print(
            f"Plan: --precision {p.precision} --offload {p.offload} --units-per-group "
            f"{p.units_per_group}{' --gradient-checkpointing' if p.gradient_checkpointing else ''}"
            f" --batch-size {p.batch_size}: {1 / p.relative_step_time:.2f}x the fastest plan's "
            f"samples/s, {p.relative_time:.1f}x its time to update every parameter once."
        )
    print(
        "Speed is a model (docs/estimate.md): time to update every parameter once = groups x step "
        f"time; step time x{CHECKPOINTING} with checkpointing, x{PAGING['host']} host / "
        f"x{PAGING['disk']} disk paging, x{PRECISION['fp32']} fp32, x{SMALLER_BATCH} per halving "
        "of the batch."
    )
    return 0 if answer.plan else 1


def _plan_line(name: str, p: Plan) -> dict[str, Any]:
    return {
        "": name,
        "precision": p.precision,
        "offload": p.offload,
        "m": p.units_per_group,
        "groups": p.groups,
        "checkpointing": "on" if p.gradient_checkpointing else "off",
        "batch": p.batch_size,
        "device GiB": p.device_gib,
        "host GiB": p.host_gib,
        "disk GiB": p.disk_gib,
        "samples/s (rel.)": 1 / p.relative_step_time,
        "time to update all (rel.)": p.relative_time,
    }
