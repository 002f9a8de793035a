"""The benchmark harness (``benchmarks/bench``) on a tiny model: adapters, worker, report."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench import adapters, methods, report, runner, worker, workload

#: The import name of each method package (a method whose package is missing is skipped).
MODULES = {
    "torch": "torch",
    "hiftune": "hiftune",
    "peft": "peft",
    "badam": "badam",
    "lomo-optim": "lomo_optim",
    "galore-torch": "galore_torch",
    "adam-mini": "adam_mini",
    "apollo-torch": "apollo_torch",
    "bitsandbytes": "bitsandbytes",
}


def _installed(m: methods.Method) -> bool:
    return importlib.util.find_spec(MODULES[m.package]) is not None


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("method", methods.METHODS, ids=lambda m: m.name)
def test_each_installed_method_trains_two_steps(method: methods.Method) -> None:
    if not _installed(method):
        pytest.skip(f"{method.package} is not installed (benchmarks/requirements-bench.txt)")
    model = workload.make_model(workload.TINY, method.dtype)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    options = dict(method.options)
    if method.family == "badam":
        options["switch_block_every"] = 1
    trainer = adapters.load(method.family).build(model, workload.lm_loss, 1e-2, 10, **options)
    batches = workload.random_batches(128, 2, 16, 2)
    losses = [trainer.step(b) for b in batches]
    trainer.close()
    assert all(math.isfinite(x) for x in losses)
    after = trainer.model.state_dict()
    changed = [k for k, v in before.items() if k in after and not torch.equal(v, after[k])]
    new = [k for k in after if k not in before]  # e.g. LoRA's adapter weights
    if method.family == "lora":
        assert new and not changed, "LoRA must leave the base weights alone"
    else:
        assert changed, f"{method.name} updated no weight in 2 steps"
    if method.name == "badam":
        assert not any("embed" in k for k in changed), "BAdam's defaults freeze the embedding"


def test_worker_times_one_cycle_of_a_cyclic_method() -> None:
    r = worker.measure(methods.get("hift-fp32-host"), workload.TINY, warmup=1, steps=1)
    assert r["cycle"] == r["timed_steps"] == len(r["step_s"]) == 4  # embed, 2 blocks, head
    assert r["peak_mib"] >= r["runtime_mib"] > 0
    assert r["peak_mib"] == max(r["setup_peak_mib"], r["train_peak_mib"])
    r = worker.measure(methods.get("fpft-fp32"), workload.TINY, warmup=1, steps=2)
    assert r["timed_steps"] == len(r["step_s"]) == 2 and r["cycle"] == 0


def test_plan_puts_the_baseline_first_at_every_batch_size() -> None:
    plan = runner.plan_for([1, 4], {1: ["lora-r8", "fpft-fp32"], 4: ["lomo", "fpft-fp32"]})
    assert plan == [("fpft-fp32", 1), ("lora-r8", 1), ("fpft-fp32", 4), ("lomo", 4)]


def test_worker_env_keeps_the_callers_pythonpath_behind_bench(monkeypatch) -> None:
    # A caller measuring another checkout puts its src first; the workers must import that one.
    monkeypatch.setenv("PYTHONPATH", "/elsewhere/src")
    env = runner.worker_env()
    assert env["PYTHONPATH"].split(":") == [str(runner.BENCH_DIR.parent), "/elsewhere/src"]
    assert env["OMP_NUM_THREADS"] == "1"
    monkeypatch.delenv("PYTHONPATH")
    assert runner.worker_env()["PYTHONPATH"] == str(runner.BENCH_DIR.parent)


def test_unknown_method_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="fpft-fp32"):
        methods.get("sgd-magic")


def _result(name: str, peak: float, step: float, **extra: float) -> dict:
    return {
        "method": name,
        "batch_size": 1,
        "model": "tiny-llama",
        "seq_len": 16,
        "peak_mib": peak,
        "runtime_mib": 100.0,
        "mean_step_s": step,
        "mean_cpu_s": step,
        "timed_steps": 2,
        "command": f"python -m bench.worker --method {name}",
        **extra,
    }


def test_badam_switch_is_amortised_over_its_default_interval() -> None:
    r = _result("badam", 1, 1.5, mean_switch_s=0.5)
    assert report.step_seconds(r) == pytest.approx(1.0 + 0.5 / 50)


def test_report_renders_tables_ratios_failures_and_the_goal(tmp_path: Path) -> None:
    out = tmp_path / "docs" / "benchmarks"
    out.mkdir(parents=True)
    load = {"time": "t", "loadavg": [0.0, 0.0, 0.0]}
    speed = {
        "started": load,
        "finished": load,
        "versions": {"torch": "9.9"},
        "settings": {"model": "tiny-llama", "seq_len": 16, "warmup": 1},
        "results": [
            _result("fpft-fp32", 400.0, 2.0),
            _result("hift-bf16-disk", 200.0, 1.0),
            _result("galore", 300.0, 2.0),
            _result("lora-r8", 150.0, 1.0),
            {"method": "apollo", "batch_size": 1, "error": "RuntimeError: no CPU kernel"},
        ],
    }
    (out / "speed.json").write_text(json.dumps(speed))
    doc = tmp_path / "docs" / "benchmarks.md"
    headline = report.render(out, doc, {"quick": "make bench-quick"})
    text = doc.read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("| hiftune bf16 mixed^Hi, disk"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["200", "0.50"]  # peak MiB and its ratio to full FT
    assert cells[5] == "0.50"  # step time ratio
    assert "| APOLLO r256 | 1 | RuntimeError: no CPU kernel |" in text
    assert "GaLore AdamW r128 300 MiB: met" in text
    assert "LoRA r8, all linear (bf16 base) 150 MiB: **missed** (+50 MiB)" in text
    assert "`make bench-quick`" in text and "| torch | 9.9 |" in text
    assert "nothing but the benchmark's own thread was running" in text  # load average 0
    assert (out / "memory_b1.png").stat().st_size > 0
    assert headline.startswith("| method | peak MiB |")
    assert "LoRA r8, all linear (bf16 base) 150 MiB: **missed** (+50 MiB)" in headline


def test_goal_is_checked_again_at_the_split_the_quality_runs_train_with() -> None:
    # The smallest split meets the goal; the 4-units-per-group row, measured alongside, does not.
    results = [
        _result("hift-bf16-disk", 200.0, 1.0),
        _result("hift-bf16-disk-m4", 260.0, 1.0),
        _result("badam", 250.0, 1.0),
    ]
    (line,) = report.goal(results, 1)
    assert line.endswith("BAdam, defaults (no embedding/head) 250 MiB: met (-50 MiB)")
    (line,) = report.goal(results, 1, ("hift-bf16-disk-m4",))
    assert line.startswith("- batch 1: hiftune bf16 mixed^Hi, disk paging, 4 units per group 260")
    assert line.endswith("**missed** (+10 MiB)")
    assert report.goal(results[:1], 1, ("hift-bf16-disk-m4",))[0].endswith("was not measured.")


def test_spread_reports_median_min_max_and_the_goal_on_medians() -> None:
    # hiftune's single worst run is above BAdam's, its median below: both are what was measured.
    results = [_result("hift-bf16-disk", p, 1.0) for p in (900.0, 860.0, 870.0)] + [
        _result("badam", p, 1.0) for p in (880.0, 890.0, 910.0)
    ]
    rows = {r["method"]: r for r in report.spread_rows(results)}
    hift = rows["hiftune bf16 mixed^Hi, disk paging"]
    assert (hift["runs"], hift["median peak MiB"], hift["min"], hift["max"]) == (3, 870, 860, 900)
    assert hift["peaks MiB"] == "900, 860, 870"
    (line,) = report.spread_goal(results, 1)
    assert line.endswith("870 MiB < BAdam, defaults (no embedding/head) 890 MiB: met (-20 MiB)")
    worse = [r for r in results if r["peak_mib"] not in (860.0, 870.0)]  # hiftune: 900 alone
    assert report.spread_goal(worse, 1)[0].endswith("**missed** (+10 MiB)")


def test_readme_headline_is_replaced_only_between_its_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("intro\n")
    assert not report.update_readme(readme, "| t |\n")
    readme.write_text(f"intro\n{report.README_BEGIN}\nold\n{report.README_END}\nend\n")
    assert report.update_readme(readme, "| t |\n")
    assert (
        readme.read_text() == f"intro\n{report.README_BEGIN}\n\n| t |\n\n{report.README_END}\nend\n"
    )


def test_scale_rows_follow_their_formulas_on_llama_2_7b() -> None:
    from bench import scale

    model = scale.meta_model("llama-2-7b")
    n = sum(p.numel() for p in dict(model.named_parameters()).values())
    rows = {r["method"]: r["gib"] for r in scale.hiftune_rows(model) + scale.formulas(model)}
    assert rows["full FT, AdamW fp32"] == pytest.approx(16 * n / 2**30)  # 4 + 4 + 8 bytes
    assert rows["8-bit AdamW"] == pytest.approx(6 * n / 2**30)  # bf16 w + g, 2 x 1-byte moments
    assert rows["LoRA r8 (bf16 base)"] < rows["LoRA r64 (bf16 base)"] < rows["hiftune fp32"]
    assert rows["BAdam, defaults"] <= rows["BAdam + embedding + head"]
