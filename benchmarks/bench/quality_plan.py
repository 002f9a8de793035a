"""The quality plan: tasks x budgets x methods, the learning-rate search and its sizes.

Per task, three budgets, the same for every method of a budget:

* ``short``: one epoch of the earlier benchmark (50 steps on MiniLM, 20 on SmolLM2, batch 8);
* ``long``: 5x the steps (5x the training examples, one epoch);
* ``equal-time``: hiftune's defaults for as many steps as fit in the training time full
  fine-tuning took for the short budget (from the short budget's measured step times), at the
  rate chosen for the short budget.

The rate of each method and budget is chosen by validation accuracy at the first seed, on a
ladder of rates 3x apart (1e-4, 3e-4, 1e-3, ...): full fine-tuning is searched first; every other
method's grid then reaches at least 3x above full FT's best, and a method whose best rate is on
its grid's edge gets the next rung on that side (at most ``max_extend`` times). The other seeds
run at the chosen rate.

Sizes (``FULL``) come from per-step costs measured on one thread of this 2-core machine while
two other jobs shared it (see :data:`STEP_S`): :func:`estimate_minutes` adds them up.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from . import methods
from .qtasks import TASKS, Task

logger = logging.getLogger(__name__)

#: The units per group of hiftune's rows (a) and (b), the paper's m and the earlier default.
PAPER_M = 4
#: PyPI's only ``lmflow`` (0.0.1.dev0) is a placeholder (3-byte ``__init__.py``, no code);
#: LMFlow installs from its GitHub repository, which this machine cannot reach.
LISA_NOTE = (
    "LISA was not run: it ships only inside LMFlow, whose only PyPI release (lmflow "
    "0.0.1.dev0) is an empty placeholder package, and LMFlow's source (GitHub) cannot be "
    "reached from this machine."
)


@dataclass
class Settings:
    """One budget of one task, the same for every method."""

    train_samples: int = 400
    val_samples: int = 200
    test_samples: int = 500
    epochs: int = 1
    batch_size: int = 8
    max_length: int = 128
    evals: int = 4
    grid: tuple[float, ...] = (3e-5, 1e-4, 3e-4)
    #: ``"short"``: start each method's grid around its rate chosen for the short budget;
    #: ``"chosen"``: run only at that rate.
    grid_from: str = ""
    max_extend: int = 2
    seeds: tuple[int, ...] = (0, 1, 2)
    #: Validation evaluations of the runs at the other seeds (0: ``evals``); their curves are
    #: not plotted, only their final accuracies count.
    seed_evals: int = 0
    methods: tuple[str, ...] = ()


@dataclass
class TaskPlan:
    """The budgets of one task (``equal_time``: run the equal-wall-time budget too)."""

    short: Settings
    long: Settings | None = None
    equal_time: bool = True
    equal_time_methods: tuple[str, ...] = ("hift-defaults",)


_MINILM_SHORT = ("fpft", "badam-rec", "hift-a", "hift-b", "hift-c", "hift-d", "hift-defaults")
_MINILM_LONG = ("fpft", "hift-defaults")
_MINILM = TaskPlan(
    Settings(methods=_MINILM_SHORT, test_samples=500, seed_evals=1),
    Settings(
        train_samples=2000,
        evals=5,
        seed_evals=1,
        grid_from="short",
        max_extend=1,
        methods=_MINILM_LONG,
    ),
)
#: SmolLM2 steps cost ~4.5 s and evaluating 200 prompts ~26 s: only the rows that differ run
#: ((b) is (a) without a new head), with 2 evaluations per run and 200 test prompts.
_SMOLLM2_SHORT = Settings(
    train_samples=160,
    test_samples=200,
    evals=2,
    seed_evals=1,
    grid=(1e-4, 3e-4, 1e-3),
    max_extend=1,
    methods=("fpft", "badam-rec", "hift-a", "hift-c", "hift-defaults"),
)
#: What one session of the 2-core machine fits (about 90 minutes by :func:`estimate_minutes`):
#: the short budget of every task with every row that tells the options apart on it, the long
#: budget on the MiniLM tasks only, no SmolLM2 equal-time budget, and no (d) on TREC. ``FULL`` is
#: the whole plan.
#: Row (e), fewer and larger groups than ``auto`` picks on the MiniLM tasks' short budget, and
#: TREC's long budget were added after the first pass (their runs alone: the others' are reused).
SESSION: dict[str, TaskPlan] = {
    "minilm": replace(_MINILM, short=replace(_MINILM.short, methods=(*_MINILM_SHORT, "hift-e"))),
    "trec": TaskPlan(
        replace(_MINILM.short, methods=(*_MINILM_SHORT[:-2], "hift-e", "hift-defaults")),
        _MINILM.long,
    ),
    "smollm2": TaskPlan(
        replace(_SMOLLM2_SHORT, methods=("fpft", "badam-rec", "hift-a", "hift-defaults")),
        equal_time=False,
    ),
}
#: ``make bench-quality``: about 100 minutes by :func:`estimate_minutes` (printed by the
#: command). SmolLM2's long budget (100 steps) does not fit in them: ``--complete`` adds it, at
#: the short budget's rates (``grid_from="chosen"``), for full FT and the defaults (about 45 min).
FULL: dict[str, TaskPlan] = {
    "minilm": _MINILM,
    "trec": _MINILM,
    "smollm2": TaskPlan(_SMOLLM2_SHORT),
}
COMPLETE: dict[str, TaskPlan] = {
    **FULL,
    "smollm2": TaskPlan(
        _SMOLLM2_SHORT,
        Settings(
            train_samples=800,
            test_samples=200,
            evals=3,
            grid_from="chosen",
            max_extend=0,
            methods=("fpft", "hift-defaults"),
        ),
    ),
}
#: A reduced plan that only shows the machinery works (minutes): tiny budgets, two seeds.
REDUCED: dict[str, TaskPlan] = {
    "minilm": TaskPlan(
        Settings(64, 200, 64, evals=2, grid=(1e-4, 1e-3), max_extend=1, seeds=(0, 1),
                 methods=("fpft", "badam-rec", "hift-b", "hift-c", "hift-defaults")),
        Settings(128, 200, 64, evals=3, grid_from="short", max_extend=0, seeds=(0, 1),
                 methods=("fpft", "hift-defaults")),
    ),
    "trec": TaskPlan(
        Settings(64, 200, 64, evals=2, grid=(1e-4, 1e-3), max_extend=0, seeds=(0, 1),
                 methods=("fpft", "badam-rec", "hift-defaults")),
    ),
    "smollm2": TaskPlan(
        Settings(16, 32, 16, evals=2, grid=(1e-4,), max_extend=0, seeds=(0,),
                 methods=("fpft", "hift-defaults")),
        equal_time=False,
    ),
}  # fmt: skip

#: Seconds per training step on one thread, by task and method family (measured on 1-2 short
#: runs per task with the others' jobs on the cores: MiniLM 50 steps full FT 18.9 s, hiftune
#: 9.5 s; SmolLM2 6 steps full FT 26.9 s), and per evaluated example and per run's start-up.
STEP_S = {
    "minilm": {"full": 0.38, "hift": 0.2, "badam": 0.15},
    "trec": {"full": 0.3, "hift": 0.16, "badam": 0.12},
    "smollm2": {"full": 4.5, "hift": 3.0, "badam": 1.6},
}
EVAL_S = {"minilm": 0.005, "trec": 0.004, "smollm2": 0.13}
START_S = {"minilm": 3.0, "trec": 3.0, "smollm2": 6.0}
#: Per worker process (Python, torch and transformers imports).
PROCESS_S = 6.0


# --- rates --------------------------------------------------------------------------------------


def _rung(lr: float) -> tuple[int, int]:
    """``lr`` as (mantissa 1 or 3, exponent) on the 1-3-10 ladder (nearest rung)."""
    e = math.floor(math.log10(lr) + 1e-9)
    m = lr / 10**e
    return (1, e) if m < math.sqrt(3) else (3, e) if m < math.sqrt(30) else (1, e + 1)


def ladder(lr: float, steps: int) -> float:
    """The rate ``steps`` rungs above (or below, negative) ``lr`` on the 1-3-10 ladder."""
    m, e = _rung(lr)
    i = 2 * e + (m == 3) + steps
    return float(f"{1 if i % 2 == 0 else 3}e{i // 2}")


def cover(grid: Sequence[float], top: float | None) -> list[float]:
    """``grid`` (sorted) extended rung by rung until it reaches ``top``."""
    out = sorted({float(f"{x:g}") for x in grid})
    while top is not None and out[-1] < top * (1 - 1e-9):
        out.append(ladder(out[-1], 1))
    return out


def choose(results: Sequence[Mapping[str, Any]]) -> float:
    """The rate with the best validation accuracy (ties: the lower rate)."""
    ok = [r for r in results if "error" not in r]
    return max(ok, key=lambda r: (r["val_acc"], -r["lr"]))["lr"]


def extension(results: Sequence[Mapping[str, Any]], grid: Sequence[float]) -> float | None:
    """The next rate to try when the best one is on the grid's edge, else ``None``."""
    if not any("error" not in r for r in results):
        return None
    best = choose(results)
    if best == min(grid):
        return ladder(best, -1)
    if best == max(grid):
        return ladder(best, 1)
    return None


# --- hiftune's options per task and budget ------------------------------------------------------


def recipe_defaults(facts: Mapping[str, Any], total: int) -> tuple[dict[str, Any], list[str]]:
    """What ``hiftune train`` would use on this task and budget, and what had to be assumed.

    Read from ``TrainRecipeConfig()`` and resolved as the recipe does
    (``hiftune.recipes.schedule.resolve_schedule``), where those exist.
    """
    from hiftune.recipes import schedule as rs
    from hiftune.recipes.config import TrainRecipeConfig

    cfg = TrainRecipeConfig()
    out: dict[str, Any] = {"offload": cfg.offload, "precision": cfg.precision}
    always = rs.AlwaysActive(tuple(facts["default_always"]), tuple(facts["default_always"]))
    sch = rs.resolve_schedule(cfg, always=always, n_units=facts["n_units"], total_steps=total)
    out.update(
        units_per_group=sch.units_per_group,
        always_active=list(sch.always_active),
        always_active_lr_scale=sch.always_active_lr_scale,
        steps_per_group=sch.steps_per_group,
    )
    notes = list(sch.notes)
    if not out["always_active"]:
        out["always_active_lr_scale"] = 1.0
    return out, notes


def resolve_options(
    method: methods.Method, task: Task, facts: Mapping[str, Any], total: int
) -> tuple[dict[str, Any], list[str]]:
    """The adapter's keyword arguments of ``method`` on ``task`` for a ``total``-step budget.

    Args:
        facts: The model's facts (:func:`task_facts`): ``n_units`` and ``default_always``.
    """
    opts = dict(method.options)
    if method.family == "badam":
        return {**opts, "active_modules": list(task.badam_active)}, []
    if method.family != "hift":
        return opts, []
    if opts.pop("defaults", False):
        return recipe_defaults(facts, total)
    base, _ = recipe_defaults(facts, total)
    head = opts.pop("head", False) and task.new_head is not None
    scale = float(opts.pop("always_active_lr_scale", 1.0))
    per_group = int(opts.get("steps_per_group", 1))
    if opts.get("units_per_group") == "fewer":  # the rule of ``--units-per-group auto``
        from hiftune.recipes.schedule import choose_units_per_group

        opts["units_per_group"] = choose_units_per_group(
            facts["n_units"], total, per_group, smallest=PAPER_M
        )
    out = {
        "offload": base["offload"],
        "precision": base["precision"],
        "units_per_group": opts["units_per_group"],
        "always_active": [task.new_head] if head else [],
        "always_active_lr_scale": scale if head else 1.0,
        "steps_per_group": per_group,
    }
    return out, []


def task_facts(task: Task) -> dict[str, Any]:
    """What the options depend on: the model's number of units and its new parameters."""
    import re

    from hiftune import HiFTConfig, split_units
    from hiftune.recipes.config import TrainRecipeConfig
    from hiftune.recipes.models import load_model_and_tokenizer, resolve_model

    model, _ = load_model_and_tokenizer(resolve_model(task.model), task.kind, task.num_labels)
    names = [n for n, _ in model.named_parameters()]
    new = [n for n in names if task.new_head and re.fullmatch(task.new_head, n)]
    facts: dict[str, Any] = {
        "n_units": len(split_units(model, HiFTConfig())),
        "params": sum(p.numel() for p in model.parameters()),
        "new_params": new,
        "default_always": [],
    }
    try:
        from hiftune.recipes import schedule as rs

        setting = getattr(TrainRecipeConfig(), "always_active", "none")
        facts["default_always"] = list(rs.resolve_always_active(model, setting, new).patterns)
    except (ImportError, AttributeError) as e:
        logger.warning("always_active of the recipe not resolved: %s", e)
    return facts


# --- the search -----------------------------------------------------------------------------------

#: ``launch(method, options, jobs)`` runs ``[(lr, seed), ...]`` and returns one result per job.
Launch = Callable[[str, dict[str, Any], list[tuple[float, int]]], list[dict[str, Any]]]


def search_budget(
    task: Task,
    s: Settings,
    facts: Mapping[str, Any],
    launch: Launch,
    start: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Runs one budget of one task: every method's rate search, then its other seeds.

    Args:
        start: Per method, the rate chosen for the short budget (``grid_from="short"``).

    Returns:
        ``settings``, ``results`` (every run), ``grids`` and ``chosen`` rates per method,
        ``options`` per method and ``same_as`` (a method whose options equal an earlier one's is
        not run again: its results are that one's).
    """
    total = math.ceil(s.train_samples / s.batch_size) * s.epochs
    out: dict[str, Any] = {"settings": _settings_dict(s), "steps": total, "results": []}
    out.update(grids={}, chosen={}, options={}, notes={}, same_as={})
    seen: dict[str, str] = {}
    top: float | None = None
    order = sorted(s.methods, key=lambda n: n != "fpft")  # full FT first: it sets the top
    for name in order:
        method = methods.get(name)
        opts, notes = resolve_options(method, task, facts, total)
        out["options"][name], out["notes"][name] = opts, notes
        key = json.dumps([method.family, method.dtype, opts], sort_keys=True)
        if key in seen:
            out["same_as"][name] = seen[key]
            continue
        seen[key] = name
        if s.grid_from == "chosen" and start and name in start:
            grid = [start[name]]  # the short budget's rate, no search (a cost cut, stated)
        elif s.grid_from == "short" and start and name in start:
            grid = [ladder(start[name], -1), start[name], ladder(start[name], 1)]
        else:
            grid = list(s.grid)
        if s.grid_from != "chosen":
            grid = cover(grid, top)
        runs = launch(name, opts, [(lr, s.seeds[0]) for lr in grid])
        for _ in range(s.max_extend):
            nxt = extension(runs, grid)
            if nxt is None:
                break
            grid = sorted([*grid, nxt])
            runs += launch(name, opts, [(nxt, s.seeds[0])])
        out["results"] += runs
        out["grids"][name] = sorted(grid)
        if not any("error" not in r for r in runs):
            continue
        best = choose(runs)
        out["chosen"][name] = best
        if name == "fpft":
            top = ladder(best, 1)  # 3x above full FT's best
        out["results"] += launch(name, opts, [(best, seed) for seed in s.seeds[1:]])
    return out


def equal_time_steps(full_train_s: float, ours_s_per_step: float) -> int:
    """hiftune's steps in the training time full FT took (at least one)."""
    return max(1, round(full_train_s / ours_s_per_step))


def _settings_dict(s: Settings) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(s)


def equal_time_settings(short: Settings, block: Mapping[str, Any], name: str) -> Settings | None:
    """The equal-wall-time budget of ``name``: full FT's median short-budget training time over
    ``name``'s median seconds per step (both at their chosen rates)."""
    full = _chosen_runs(block, "fpft")
    ours = _chosen_runs(block, block.get("same_as", {}).get(name, name))
    if not full or not ours:
        return None
    t_full = statistics.median(r["train_s"] for r in full)
    per_step = statistics.median(r["train_s"] / r["steps"] for r in ours)
    steps = equal_time_steps(t_full, per_step)
    return replace(
        short,
        train_samples=steps * short.batch_size,
        grid=(block["chosen"][block.get("same_as", {}).get(name, name)],),
        grid_from="",
        max_extend=0,
        methods=(name,),
    )


def _chosen_runs(block: Mapping[str, Any], name: str) -> list[Mapping[str, Any]]:
    lr = block["chosen"].get(name)
    return [
        r for r in block["results"] if r["method"] == name and r["lr"] == lr and "error" not in r
    ]


#: The facts :func:`task_facts` finds (for :func:`estimate_minutes`, which loads no model).
ESTIMATE_FACTS = {
    "minilm": {"n_units": 15, "default_always": [r"classifier\.weight", r"classifier\.bias"]},
    "trec": {"n_units": 15, "default_always": [r"classifier\.weight", r"classifier\.bias"]},
    "smollm2": {"n_units": 39, "default_always": []},
}


def estimate_minutes(plan: Mapping[str, TaskPlan]) -> dict[str, float]:
    """Minutes per task and budget from :data:`STEP_S`, :data:`EVAL_S` and :data:`START_S`:
    rows whose options equal an earlier row's are not counted (they are not run), and one rate
    extension is assumed for half of the methods."""
    out: dict[str, float] = {}
    for task_name, tp in plan.items():
        task = TASKS[task_name]
        for budget, s in (("short", tp.short), ("long", tp.long)):
            if s is None:
                continue
            steps = math.ceil(s.train_samples / s.batch_size) * s.epochs
            evals = s.evals * s.val_samples + s.test_samples
            seed_evals = (s.seed_evals or s.evals) * s.val_samples + s.test_samples
            total, seen = 0.0, set()
            for name in s.methods:
                method = methods.get(name)
                opts, _ = resolve_options(method, task, ESTIMATE_FACTS[task_name], steps)
                key = json.dumps([method.family, method.dtype, opts], sort_keys=True)
                if key in seen:
                    continue
                seen.add(key)
                train = steps * STEP_S[task_name][method.family] + START_S[task_name]
                grid = {"chosen": 1, "short": 3}.get(s.grid_from, max(3, len(s.grid)))
                searched = grid + min(s.max_extend, 1) * 0.5
                total += searched * (train + evals * EVAL_S[task_name]) + 3 * PROCESS_S
                total += (len(s.seeds) - 1) * (train + seed_evals * EVAL_S[task_name])
            out[f"{task_name} {budget}"] = total / 60
        if tp.equal_time:
            s = tp.short
            steps = math.ceil(s.train_samples / s.batch_size)
            t_full = steps * STEP_S[task_name]["full"]
            per_run = t_full + (s.evals * s.val_samples + s.test_samples) * EVAL_S[task_name]
            out[f"{task_name} equal-time"] = (len(s.seeds) * per_run + PROCESS_S) / 60
    out["total"] = sum(out.values())
    return out


@dataclass
class Plan:
    """A named plan (``full`` or ``reduced``)."""

    name: str
    tasks: dict[str, TaskPlan] = field(default_factory=dict)


def plan(reduced: bool = False, complete: bool = False, session: bool = False) -> Plan:
    """The plan ``bench quality`` runs."""
    if reduced:
        return Plan("reduced", REDUCED)
    if session:
        return Plan("session", SESSION)
    return Plan("complete", COMPLETE) if complete else Plan("full", FULL)


def tasks_of(p: Plan) -> dict[str, Task]:
    """The :class:`Task` of each task name in ``p``."""
    return {name: TASKS[name] for name in p.tasks}
