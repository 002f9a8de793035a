"""``hiftune estimate``: argument parsing, then a call into :mod:`hiftune.memory.estimate`."""

from __future__ import annotations

import argparse
import json

from ..engine.config import PRECISIONS
from ..engine.optimizers import OPTIMIZERS
from ..memory.estimate import DEFAULT_PRECISIONS, HIFT_MIXED, build_meta_model, estimate, render
from .types import add_model_arguments, comma_list


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the arguments of ``hiftune estimate``."""
    add_model_arguments(parser)
    parser.add_argument(
        "--num-labels", type=int, default=2, help="classes of the seq-cls head (default 2)"
    )
    parser.add_argument(
        "--units-per-group", "-m", type=int, default=1, help="m, units per HiFT group (default 1)"
    )
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
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")


def run(args: argparse.Namespace) -> int:
    """Runs ``hiftune estimate``: prints a table (or JSON) to stdout."""
    model = build_meta_model(args.model, args.task, args.num_labels)
    rows = estimate(
        model,
        units_per_group=args.units_per_group,
        optimizers=args.optimizer,
        precisions=args.precision,
        hift_mixed=args.hift_mixed,
        task=args.task,
        num_labels=args.num_labels,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
    )
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    params = sum(p.numel() for p in model.parameters())
    text = render(
        rows,
        model=args.model,
        task=args.task,
        params=params,
        units_per_group=args.units_per_group,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
    )
    print(text, end="")
    return 0
