"""``hiftune profile`` on a tiny llama: the CLI end to end, the measurements, the bad inputs.

The parent (``memory.profile``), the worker (``memory.profile_worker``) and the CLI are tested
together: the CLI tests start real worker subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hiftune import HiFTOptimizer
from hiftune.cli import main
from hiftune.errors import UserError
from hiftune.memory import profile as prof
from hiftune.memory import profile_report
from hiftune.memory import profile_worker as worker
from hiftune.memory.measure import MiB

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(TINY_LLAMA))
    return path


def tiny_params() -> tuple[int, int]:
    """(parameters, bytes of the largest unit) of TINY_LLAMA, counted by hand."""
    d, f, v = 32, 64, 64
    block = d * d * 2 + d * 16 * 2 + 3 * d * f + 2 * d  # q, o; k, v (1 kv head of 16); mlp; norms
    embed = v * d  # tied with the LM head
    return embed + 2 * block + d, max(embed, block) * 4


def test_cli_end_to_end(tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code = main(
        ["profile", str(tiny_config), "--seq-len", "8", "--steps", "2", "--warmup", "1",
         "--offload", "disk", "--output-dir", str(out), "--json", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["command"].startswith(f"hiftune profile {tiny_config} ")
    assert [r["label"] for r in result["runs"]] == ["FPFT fp32", "HiFT disk fp32"]
    for run in result["runs"]:
        mem = run["memory_mib"]
        assert set(mem) >= {"peak", "weights", "gradients", "optimizer_states", "rest", "runtime"}
        assert mem["peak"] > mem["runtime"] > 0
        assert mem["rest"] == pytest.approx(
            mem["peak"] - mem["weights"] - mem["gradients"] - mem["optimizer_states"]
        )
        assert run["time_s"]["timed_steps"] == 2 and run["time_s"]["mean_step"] > 0
        phases = [s["phase"] for s in run["steps"]]
        assert phases == ["warmup", "memory", "memory", "timing", "timing"]
        assert run["environment"]["malloc"] == worker.MALLOC_ENV
    fpft, hift = result["runs"]
    assert hift["num_groups"] == 4  # embed (+ tied head), 2 blocks, final norm
    (ratio,) = result["ratios"]
    assert ratio["peak_vs_fpft"] == pytest.approx(
        hift["memory_mib"]["peak"] / fpft["memory_mib"]["peak"]
    )
    assert ratio["time_vs_fpft"] == pytest.approx(
        hift["time_s"]["mean_step"] / fpft["time_s"]["mean_step"]
    )
    assert ratio["time_vs_none"] is None and ratio["peak_vs_discard"] is None
    assert (out / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "profile.json").read_text())["ratios"] == result["ratios"]
    md = (out / "profile.md").read_text()
    assert result["command"] in md and "| HiFT disk fp32 |" in md


def test_table_printed_without_json(tiny_config: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["profile", str(tiny_config.parent), "--seq-len", "4", "--steps", "1",
                 "--warmup", "0", "--methods", "hift", "--offload", "none", "--no-progress"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("| config | peak MiB |") and "| HiFT none fp32 |" in out


def test_breakdown_follows_the_memory_model(tiny_config: Path) -> None:
    """In process (peaks are meaningless here, the byte counts are exact)."""
    n, largest_unit = tiny_params()
    common = dict(model=str(tiny_config), seq_len=8, steps=4, warmup=4)
    fpft = worker.measure_run(worker.RunSpec(method="fpft", **common))["memory_mib"]
    assert fpft["weights"] * MiB == n * 4
    assert fpft["gradients"] * MiB == n * 4
    # AdamW: exp_avg and exp_avg_sq per parameter, plus a 4-byte step count per tensor.
    assert 2 * n * 4 < fpft["optimizer_states"] * MiB < 2 * n * 4 + 4 * 64

    runs = {
        offload: worker.measure_run(worker.RunSpec(method="hift", offload=offload, **common))
        for offload in ("none", "disk", "discard")
    }
    for offload in ("disk", "discard"):
        mem = runs[offload]["memory_mib"]
        assert mem["weights"] == fpft["weights"]
        assert mem["gradients"] * MiB == largest_unit
        assert 2 * largest_unit <= mem["optimizer_states"] * MiB < 2 * largest_unit + 256
    # offload="none" keeps every group's state on the device once each group has stepped.
    assert runs["none"]["memory_mib"]["optimizer_states"] == pytest.approx(fpft["optimizer_states"])
    assert [s["group"] for s in runs["disk"]["steps"][:4]] == [
        "embed", "layers.0", "layers.1", "head"
    ]  # fmt: skip
    assert runs["disk"]["num_groups"] == 4


def test_mixed_precision_counts_active_masters(tiny_config: Path) -> None:
    n, largest_unit = tiny_params()
    run = worker.measure_run(
        worker.RunSpec(str(tiny_config), "hift", seq_len=8, steps=4, warmup=0, precision="bf16")
    )
    mem = run["memory_mib"]
    # bf16 model + fp32 masters of the largest group; gradients in fp32 on the masters.
    assert mem["weights"] * MiB == n * 2 + largest_unit
    assert mem["gradients"] * MiB == largest_unit
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in run["steps"])


def test_optimizer_names_are_the_engine_registry(tiny_config: Path) -> None:
    """``adafactor`` is transformers' Adafactor (as in train and estimate): factored state."""
    n, _ = tiny_params()
    spec = worker.RunSpec(
        str(tiny_config), "fpft", optimizer="adafactor", seq_len=8, steps=1, warmup=0
    )
    run = worker.measure_run(spec)
    assert run["optimizer_class"] == "transformers.optimization.Adafactor"
    # Row and column second moments per matrix: far less than one value per parameter.
    assert 0 < run["memory_mib"]["optimizer_states"] * MiB < n
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in run["steps"])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "lora"}, "method must be one of"),
        ({"optimizer": "lion"}, "optimizer must be one of"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"offload": "discard", "precision": "bf16"}, "master weights"),
        ({"max_unit_params": 0}, "max_unit_params must be"),
        ({"group_by": "bytes"}, "group_by must be one of"),
    ],
)
def test_run_spec_rejects_bad_fields(fields: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        worker.RunSpec(**{"model": "gpt2", "method": "hift", **fields})


def test_build_specs_raises_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="neither a preset"):
        prof.build_specs(str(tmp_path / "nowhere"))


def test_worker_entry_point_needs_two_arguments() -> None:
    """The module the parent starts with ``python -m`` exists and refuses a bad command line."""
    proc = subprocess.run(
        [sys.executable, "-m", worker.__name__], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2 and "SPEC_JSON RESULT_PATH" in proc.stderr


def test_discard_store_drops_everything() -> None:
    store = worker.DiscardStore()
    store.put(3, {"x": torch.ones(4)})
    assert 3 in store and store.peek(3) == {}
    assert store.get(3) == {} and 3 not in store


def test_build_specs_defaults_to_one_cycle(tiny_config: Path) -> None:
    specs = prof.build_specs(
        str(tiny_config), offloads=["disk", "discard"], units_per_group=2, seq_len=8
    )
    assert [s.label for s in specs] == ["FPFT fp32", "HiFT disk fp32", "HiFT discard fp32"]
    assert [(s.steps, s.warmup) for s in specs] == [(2, 1), (2, 2), (2, 2)]  # k = ceil(4 / 2)


def test_count_groups_follows_the_unit_budget() -> None:
    """SmolLM2-135M: 30 blocks of 3.54M, a tied 28.3M embedding, a final norm (m = 1)."""
    from hiftune.engine.config import HiFTConfig

    paper = prof.count_groups("smollm2-135m", hift=HiFTConfig(max_unit_params=None))
    assert paper == 1 + 30 + 1
    # The default budget is the largest block: the embedding becomes ceil(28.3 / 3.54) = 8 shards.
    assert prof.count_groups("smollm2-135m") == 8 + 30 + 1
    balanced = HiFTConfig(units_per_group=4, group_by="size")
    assert prof.count_groups("smollm2-135m", hift=balanced) == 10  # ceil(39 / 4)


def test_discard_floor_only_for_fp32(tiny_config: Path) -> None:
    specs = prof.build_specs(
        str(tiny_config), offloads=["disk", "discard"], precisions=["fp32", "bf16"], seq_len=8
    )
    labels = ["FPFT fp32", "HiFT disk fp32", "HiFT discard fp32", "HiFT disk bf16"]
    assert [s.label for s in specs] == labels


def test_compare_handles_missing_baselines() -> None:
    def run(method: str, offload: str, peak: float, step: float) -> dict:
        return {
            "label": f"{method} {offload}",
            "spec": {"method": method, "offload": offload, "precision": "fp32"},
            "memory_mib": {"peak": peak},
            "time_s": {"mean_step": step},
        }

    ratios = prof.compare([run("hift", "disk", 50, 3), run("hift", "discard", 40, 2)])
    assert ratios[0]["peak_vs_discard"] == pytest.approx(1.25)
    assert ratios[0]["peak_vs_fpft"] is None and ratios[0]["time_vs_none"] is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--offload", "discard", "--precision", "bf16,fp16"], "master weights"),
        (["--offload", "discard", "--optimizer", "adagrad"], "cannot run adagrad"),
        (["--offload", "discard", "--optimizer", "adafactor"], "cannot run adafactor"),
        (["--offload", "tape"], "offload must be"),
        (["--methods", "lora"], "method must be"),
        (["--units-per-group", "9"], "units_per_group must be between 1 and"),
        (["--seq-len", "257"], "max_position_embeddings"),
    ],
)
def test_bad_combinations_exit_2(
    tiny_config: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["profile", str(tiny_config), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hiftune profile: error: ") and len(err.strip().splitlines()) == 1
    assert message in err


def test_bad_model_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["profile", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert "neither a preset" in capsys.readouterr().err


def test_bad_number_exits_2(tiny_config: Path) -> None:
    with pytest.raises(SystemExit) as e:
        main(["profile", str(tiny_config), "--batch-size", "0"])
    assert e.value.code == 2


def _result(reserved: float | None, pinned: float | None) -> dict:
    mem = {"peak": 100.0, "weights": 40.0, "gradients": 10.0, "optimizer_states": 20.0,
           "rest": 30.0, "runtime": 0.0, "reserved_peak": reserved, "pinned_peak": pinned}  # fmt: skip
    time_s = {"mean_step": 0.5, "mean_step_cpu": 0.5, "timed_steps": 4}
    return {
        "ratios": [],
        "runs": [{"label": "HiFT host bf16", "memory_mib": mem, "time_s": time_s}],
    }


def test_the_table_shows_reserved_and_pinned_memory_of_a_cuda_run() -> None:
    (row,) = profile_report.table_rows(_result(reserved=128.0, pinned=512.0))
    assert (row["peak MiB"], row["reserved"], row["pinned"]) == (100.0, 128.0, 512.0)
    (row,) = profile_report.table_rows(_result(reserved=None, pinned=None))  # a CPU run
    assert "reserved" not in row and "pinned" not in row


def test_a_cpu_run_records_no_cuda_figures(tiny_config: Path) -> None:
    spec = worker.RunSpec(str(tiny_config), "hift", seq_len=4, steps=1, warmup=0)
    run = worker.measure_run(spec)
    assert run["memory_mib"]["reserved_peak"] is None and run["memory_mib"]["pinned_peak"] is None
    assert all(s["reserved_mib"] is None and s["pinned_mib"] is None for s in run["steps"])


def test_pinned_memory_adds_the_host_stores_own_buffers() -> None:
    # The host store pins its buffers with cudaHostRegister, which the caching host allocator
    # (the meter's figure) never sees.
    class Meter:
        def peak_pinned(self) -> float | None:
            return 10.0

    class PinningStore(worker.DiscardStore):
        def pinned_bytes(self) -> int:
            return 2 * 2**20

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    opt = HiFTOptimizer(model, torch.optim.SGD, store=PinningStore(), lr=0.1)
    try:
        assert worker._pinned_mib(Meter(), opt) == 12.0  # type: ignore[arg-type]
        plain = torch.optim.SGD(model.parameters())
        assert worker._pinned_mib(Meter(), plain) == 10.0  # type: ignore[arg-type]
    finally:
        opt.close()
