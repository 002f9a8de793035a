"""The benchmark's command line (what ``make bench`` and ``make bench-quick`` call).

    PYTHONPATH=benchmarks .venv/bin/python -m bench quick     # memory/speed, < 15 min
    PYTHONPATH=benchmarks .venv/bin/python -m bench full      # + quality (bench-quality's plan)
    PYTHONPATH=benchmarks .venv/bin/python -m bench quality   # the quality plan only
    PYTHONPATH=benchmarks .venv/bin/python -m bench spread    # repeated peaks of the closest rows
    PYTHONPATH=benchmarks .venv/bin/python -m bench render    # rebuild docs/benchmarks.md only

Results go to ``docs/benchmarks/*.json`` (and PNGs), the document to ``docs/benchmarks.md``;
per-run logs to ``runs/bench/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from hiftune.memory.render import write_json

from . import methods, quality, quality_plan, report, runner, scale

ROOT = runner.ROOT
OUT = ROOT / "docs" / "benchmarks"
DOC = ROOT / "docs" / "benchmarks.md"
LOGS = ROOT / "runs" / "bench"
COMMANDS = {
    "memory/speed table only (< 15 min)": "make bench-quick",
    "everything (memory/speed, then the quality plan)": "make bench",
    "the quality plan only (3 tasks, 2 budgets + equal wall time)": "make bench-quality",
    "the run-to-run spread of the closest peaks (about 15 min)": "make bench-spread",
    "the quality plan on the reduced setting (minutes)": (
        "PYTHONPATH=benchmarks .venv/bin/python -m bench quality --reduced"
    ),
    "the part of the quality plan this page shows (about 95 min; finished runs are reused)": (
        "PYTHONPATH=benchmarks .venv/bin/python -m bench quality --session"
    ),
    "the quality plan with SmolLM2's long budget too": (
        "PYTHONPATH=benchmarks .venv/bin/python -m bench quality --complete"
    ),
    "re-render this page from the JSON": "PYTHONPATH=benchmarks .venv/bin/python -m bench render",
}
#: Timed steps of the methods that do the same work every step (after one warm-up step).
QUICK_STEPS, FULL_STEPS = 2, 4
#: ``bench spread``: hiftune's bf16 row and the rows nearest to it in the memory goal.
SPREAD_METHODS = ("hift-bf16-disk", "badam", "lora-r8", "lomo")


def speed(batch_plan: dict[int, list[str]], steps: int, model: str, seq_len: int) -> None:
    """Measures the memory/speed plan and writes ``speed.json``."""
    plan = runner.plan_for(sorted(batch_plan), batch_plan)
    result = runner.run_matrix(
        plan, LOGS / "speed", model=model, seq_len=seq_len, warmup=1, steps=steps, threads=1
    )
    write_json(OUT / "speed.json", result)


def spread(names: list[str], batch_sizes: list[int], repeats: int) -> None:
    """Measures the same configurations ``repeats`` times and writes ``spread.json``.

    The peak resident set of one run varies by tens of MiB from run to run (where the allocator's
    heap happens to fragment), as much as some gaps in the memory goal. Each repeat runs the whole
    plan in order, so that a drift of the machine affects every method alike.
    """
    plan = runner.plan_for(batch_sizes, {b: names for b in batch_sizes})
    runs = [
        runner.run_matrix(
            plan,
            LOGS / "spread" / f"run{i}",
            model="smollm2-135m",
            seq_len=128,
            warmup=1,
            steps=QUICK_STEPS,
            threads=1,
        )
        for i in range(repeats)
    ]
    result = {
        "started": runs[0]["started"],
        "finished": runs[-1]["finished"],
        "repeats": repeats,
        "results": [r for run in runs for r in run["results"]],
    }
    write_json(OUT / "spread.json", result)


def render() -> None:
    """Writes the document (and the README's headline table, where it has the markers)."""
    headline = report.render(OUT, DOC, COMMANDS)
    if report.update_readme(ROOT / "README.md", headline):
        logging.info("updated the headline table in README.md")
    logging.info("wrote %s", DOC.relative_to(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("quick", help="memory/speed (all methods at batch 1, a subset at 4) + scale")
    sub.add_parser("full", help="memory/speed (all methods, batch 1 and 4) + scale + quality")
    sp = sub.add_parser("speed", help="only the memory/speed runs of the given methods")
    sp.add_argument("--methods", nargs="+", default=[m.name for m in methods.METHODS])
    sp.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    sp.add_argument("--steps", type=int, default=FULL_STEPS)
    sp.add_argument("--model", default="smollm2-135m")
    sp.add_argument("--seq-len", type=int, default=128)
    qp = sub.add_parser("quality", help="only the quality runs")
    qp.add_argument("--reduced", action="store_true", help="a few minutes, to show it works")
    qp.add_argument("--complete", action="store_true", help="also SmolLM2's long budget")
    qp.add_argument(
        "--session", action="store_true", help="the part that fits one session (about 90 min)"
    )
    qp.add_argument(
        "--tasks",
        nargs="+",
        choices=sorted(quality_plan.FULL),
        help="only these tasks; the others' results in quality.json (same plan) are kept",
    )
    rp = sub.add_parser("spread", help="repeated memory runs of the rows closest to hiftune's")
    rp.add_argument("--methods", nargs="+", default=list(SPREAD_METHODS))
    rp.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    rp.add_argument("--repeats", type=int, default=3)
    sub.add_parser("scale", help="only the 7B/8B predictions")
    sub.add_parser("render", help="only rebuild docs/benchmarks.md from the JSON")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    everyone = [m.name for m in methods.METHODS]
    if a.command == "quick":
        speed({1: everyone, 4: list(methods.QUICK_B4)}, QUICK_STEPS, "smollm2-135m", 128)
    elif a.command == "full":
        speed({1: everyone, 4: everyone}, FULL_STEPS, "smollm2-135m", 128)
    elif a.command == "speed":
        for name in a.methods:
            methods.get(name)  # fail early on a typo
        speed({b: list(a.methods) for b in a.batch_sizes}, a.steps, a.model, a.seq_len)
    elif a.command == "spread":
        for name in a.methods:
            methods.get(name)
        if a.repeats < 2:
            p.error("--repeats must be at least 2 (a spread needs several runs)")
        spread(list(a.methods), list(a.batch_sizes), a.repeats)
    if a.command in ("quick", "full", "scale"):
        write_json(OUT / "scale.json", scale.predict())
    if a.command in ("full", "quality"):
        plan = quality_plan.plan(
            getattr(a, "reduced", False),
            getattr(a, "complete", False),
            getattr(a, "session", False),
        )
        if getattr(a, "tasks", None):
            plan = quality_plan.Plan(plan.name, {t: plan.tasks[t] for t in a.tasks})
        estimate = quality_plan.estimate_minutes(plan.tasks)
        logging.info(
            "quality plan %s, estimated %.0f min: %s", plan.name, estimate["total"],
            ", ".join(f"{k} {v:.1f}" for k, v in estimate.items() if k != "total"),
        )  # fmt: skip
        path = OUT / "quality.json"
        previous = json.loads(path.read_text()) if path.is_file() else None

        def save(result: dict) -> None:
            write_json(path, result)

        save(quality.run_all(plan, LOGS / "quality", previous, save))
    render()
    return 0


if __name__ == "__main__":
    sys.exit(main())
