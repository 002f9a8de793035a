"""The quality plan's logic (``bench.quality_plan``, ``bench.quality_report``) on fixed numbers:
rate ladder and grid extension, option resolution, updates per weight, time to 95%, verdicts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench import adapters, methods, quality_plan, quality_report, workload
from bench.qtasks import TASKS
from bench.quality_plan import Settings

FACTS = {"n_units": 15, "default_always": []}


def test_ladder_steps_by_3x_and_cover_reaches_the_top() -> None:
    assert quality_plan.ladder(1e-4, 1) == 3e-4
    assert quality_plan.ladder(3e-4, 1) == 1e-3
    assert quality_plan.ladder(1e-4, -1) == 3e-5
    assert quality_plan.ladder(3e-5, -2) == 3e-6
    assert quality_plan.cover([1e-4, 3e-5], 1e-3) == [3e-5, 1e-4, 3e-4, 1e-3]
    assert quality_plan.cover([1e-4, 3e-4], None) == [1e-4, 3e-4]


def _r(lr: float, val: float, seed: int = 0) -> dict[str, Any]:
    return {"lr": lr, "seed": seed, "val_acc": val}


def test_a_best_rate_on_an_edge_extends_the_grid_that_way() -> None:
    grid = [1e-4, 3e-4, 1e-3]
    assert quality_plan.extension([_r(1e-4, 0.6), _r(3e-4, 0.7), _r(1e-3, 0.8)], grid) == 3e-3
    assert quality_plan.extension([_r(1e-4, 0.9), _r(3e-4, 0.7), _r(1e-3, 0.8)], grid) == 3e-5
    assert quality_plan.extension([_r(1e-4, 0.6), _r(3e-4, 0.9), _r(1e-3, 0.8)], grid) is None
    # A tie goes to the lower rate.
    assert quality_plan.choose([_r(1e-4, 0.8), _r(3e-4, 0.8)]) == 1e-4


def _fake_launch(best: dict[str, float], calls: list) -> quality_plan.Launch:
    """Validation accuracy peaks at ``best[method]`` (1 - distance in rungs / 10)."""
    import math

    def launch(method: str, options: dict, jobs: list) -> list[dict[str, Any]]:
        calls.append((method, [lr for lr, _ in jobs], [s for _, s in jobs]))
        out = []
        for lr, seed in jobs:
            val = 1 - abs(math.log10(lr / best[method])) / 5
            out.append({"method": method, "lr": lr, "seed": seed, "val_acc": val,
                        "test_acc": val, "train_s": 10.0, "steps": 50, "curve": [],
                        "updates_per_weight": 1.0})  # fmt: skip
        return out

    return launch


def test_search_extends_edges_covers_3x_above_full_ft_and_reuses_equal_rows() -> None:
    s = Settings(grid=(3e-5, 1e-4, 3e-4), max_extend=2, seeds=(0, 1, 2),
                 methods=("hift-a", "fpft", "hift-b", "badam-rec"))  # fmt: skip
    calls: list = []
    best = {"fpft": 3e-4, "hift-a": 1e-2, "badam-rec": 1e-4}
    block = quality_plan.search_budget(TASKS["smollm2"], s, FACTS, _fake_launch(best, calls), None)
    # Full FT first; its best (3e-4) was on the edge: one rung more, then it is inside.
    assert calls[0] == ("fpft", [3e-5, 1e-4, 3e-4], [0, 0, 0])
    assert calls[1] == ("fpft", [1e-3], [0])
    assert block["chosen"]["fpft"] == 3e-4 and block["grids"]["fpft"][-1] == 1e-3
    # Every other grid reaches 3x above full FT's best (1e-3); hift-a's best is beyond: extended
    # twice (the cap), still on the edge.
    assert block["grids"]["hift-a"] == [3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    assert quality_report.on_edge(block, "hift-a")
    assert block["grids"]["badam-rec"][-1] == 1e-3
    # (b) has no new head on SmolLM2: the same options as (a), so it is not run again.
    assert block["same_as"] == {"hift-b": "hift-a"}
    assert not any(c[0] == "hift-b" for c in calls)
    assert ("hift-a", [1e-2, 1e-2], [1, 2]) in calls  # the other seeds at the chosen rate
    assert [r["lr"] for r in quality_report.chosen_runs(block, "hift-b")] == [1e-2] * 3


def test_options_per_task_and_budget() -> None:
    minilm, smollm2 = TASKS["minilm"], TASKS["smollm2"]
    b, _ = quality_plan.resolve_options(methods.get("hift-b"), minilm, FACTS, 50)
    assert b["always_active"] == [r"classifier\..*"] and b["always_active_lr_scale"] == 3.0
    assert b["units_per_group"] == 4 and b["steps_per_group"] == 1
    b, _ = quality_plan.resolve_options(methods.get("hift-b"), smollm2, FACTS, 20)
    assert b["always_active"] == [] and b["always_active_lr_scale"] == 1.0
    facts = {"n_units": 39, "default_always": []}
    c, _ = quality_plan.resolve_options(methods.get("hift-c"), smollm2, facts, 20)
    assert c["units_per_group"] == 20  # 2 groups of 10 updates in 20 steps
    d, _ = quality_plan.resolve_options(methods.get("hift-d"), minilm, FACTS, 50)
    assert (d["units_per_group"], d["steps_per_group"]) == (4, 4)
    badam, _ = quality_plan.resolve_options(methods.get("badam-rec"), minilm, FACTS, 50)
    assert badam == {"switch_block_every": 50, "active_modules": ["classifier."]}


def test_hift_updates_each_weight_once_per_cycle_and_always_active_every_step() -> None:
    model = workload.make_model(workload.TINY, "fp32")
    weights = sum(p.numel() for p in model.parameters())
    head = "model.norm.weight"
    trainer = adapters.load("hift").build(
        model, workload.lm_loss, 1e-3, 10, units_per_group=1, always_active=[head]
    )
    k = trainer.optimizer.num_groups  # type: ignore[union-attr]
    updated = 0
    for batch in workload.random_batches(128, 2, 8, k):
        updated += trainer.updated_numel()
        trainer.step(batch)
    trainer.close()
    norm = dict(model.named_parameters())[head].numel()
    assert updated == weights + (k - 1) * norm


def _block(runs: dict[str, list[tuple[float, float]]], **extra: Any) -> dict[str, Any]:
    """A budget whose methods each ran at lr 1e-4: (test acc, val acc) per seed."""
    results = [
        {"method": m, "lr": 1e-4, "seed": i, "test_acc": t, "val_acc": v, "train_s": 10.0 * (i + 1),
         "steps": 50, "updates_per_weight": 2.0,
         "curve": [{"step": 25, "train_s": 5.0, "val_acc": v - 0.1},
                   {"step": 50, "train_s": 10.0, "val_acc": v}]}
        for m, seeds in runs.items() for i, (t, v) in enumerate(seeds)
    ]  # fmt: skip
    return {
        "settings": {"methods": list(runs), "seeds": [0, 1, 2]},
        "results": results,
        "chosen": {m: 1e-4 for m in runs},
        "grids": {m: [3e-5, 1e-4, 3e-4] for m in runs},
        "options": {},
        **extra,
    }


def test_time_to_95_percent_of_full_ft_is_the_first_evaluation_at_the_target() -> None:
    block = _block({"fpft": [(0.8, 0.8)] * 3, "hift-defaults": [(0.7, 0.85)] * 3,
                    "badam-rec": [(0.6, 0.7)] * 3})  # fmt: skip
    target, hits = quality_report.time_to_target(block)
    assert target == pytest.approx(0.76)
    assert hits["hift-defaults"] == {
        "step": 25,
        "train_s": 5.0,
        "val_acc": pytest.approx(0.75),
    } or (hits["hift-defaults"]["step"] == 50)
    assert hits["fpft"]["step"] == 50 and hits["badam-rec"] is None


def test_verdicts_are_computed_from_the_medians_with_their_gaps() -> None:
    full = [(0.80, 0.8), (0.70, 0.8), (0.90, 0.8)]  # median 0.80
    short = _block(
        {
            "fpft": full,
            "badam-rec": [(0.74, 0.7)] * 3,
            "hift-defaults": [(0.76, 0.7), (0.75, 0.7), (0.10, 0.7)],
        }
    )  # median 0.75
    long = _block({"fpft": full, "hift-defaults": [(0.79, 0.8)] * 3})
    eq = _block({"hift-defaults": [(0.795, 0.8)] * 3})
    q = {"tasks": {
        "minilm": {"budgets": {"short": short, "long": long, "equal-time": eq}},
        "trec": {"budgets": {"short": short, "equal-time": _block({"hift-defaults": [(0.5, 0.5)]})}},
    }}  # fmt: skip
    lines = quality_report.verdicts(q)
    assert lines[0] == (
        "- short, minilm: hiftune defaults vs full FT 75.0 vs 80.0: met (-5.0 points; limit -5.0)"
    )
    assert lines[1].endswith("75.0 vs 74.0: met (+1.0 points; ahead)")
    assert lines[2] == (
        "- long, minilm: hiftune defaults vs full FT 79.0 vs 80.0: met (-1.0 points; limit -1.5)"
    )
    assert lines[3].endswith("79.5 vs 80.0: met (-0.5 points; limit -1.0)")
    assert lines[6] == "- long, trec: not run in this plan"
    assert lines[7].endswith("50.0 vs 80.0: **missed** (-30.0 points; limit -1.0)")
    assert lines[-1] == "- equal wall time: within 1 point on 1 of 2 tasks (target: 2): **missed**"


def test_equal_time_budget_fits_full_fts_training_time() -> None:
    short = _block({"fpft": [(0.8, 0.8)] * 3, "hift-defaults": [(0.7, 0.7)] * 3})
    # full FT: median 20 s; hiftune: median 20 s for 50 steps -> 0.4 s/step -> 50 steps.
    eq = quality_plan.equal_time_settings(Settings(), short, "hift-defaults")
    assert eq is not None and eq.train_samples == 50 * 8 and eq.grid == (1e-4,)
    assert quality_plan.equal_time_steps(19.0, 0.2) == 95


def test_reduced_and_full_plans_are_estimated() -> None:
    full = quality_plan.estimate_minutes(quality_plan.FULL)
    assert full["total"] == pytest.approx(sum(v for k, v in full.items() if k != "total"))
    assert quality_plan.estimate_minutes(quality_plan.REDUCED)["total"] < 20


def test_a_task_run_again_reuses_the_runs_it_finished() -> None:
    from bench import quality

    settings = {"train_samples": 8, "grid": [1e-4]}
    opts = {"units_per_group": 4}
    run = {"method": "hift-a", "lr": 1e-4, "seed": 0, "test_acc": 0.5}
    failed = {"method": "hift-a", "lr": 3e-4, "seed": 0, "error": "boom"}
    earlier = {
        "budgets": {
            "short": {"settings": settings, "options": {"hift-a": opts}, "results": [run, failed]}
        }
    }
    done = quality._earlier_runs(earlier)
    # A finished run is found under the key a new invocation computes; a failed one is run again.
    assert done == {quality._run_key("short", settings, "hift-a", opts, 1e-4, 0): run}
    assert (
        quality._run_key("short", settings, "hift-a", {"units_per_group": 8}, 1e-4, 0) not in done
    )
    assert quality._run_key("long", settings, "hift-a", opts, 1e-4, 0) not in done
    # A plan that gained a method still finds the runs of the others.
    more = {**settings, "methods": ["fpft", "hift-a"]}
    assert quality._run_key("short", more, "hift-a", opts, 1e-4, 0) in done
