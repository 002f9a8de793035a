"""``make gpu-check``'s script, ``--smoke``: every check runs on a tiny Llama on the CPU, passes,
and the CUDA-only ones say SKIP."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_check


@pytest.mark.slow
def test_the_smoke_run_passes_and_skips_the_cuda_checks(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    out = tmp_path / "figures.json"
    assert gpu_check.main(["--smoke", "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if ": " in line]
    status = {line.split(": ")[0].split(" ", 1)[1]: line.split(" ")[0] for line in lines}
    passed = {"paging host fp32", "paging disk fp32", "paging host bf16", "bf16 tracks fp32",
              "reference", "fp16 overflow"}  # fmt: skip
    skipped = {"store races host", "store races disk", "memory", "speed"}
    assert status == {**dict.fromkeys(passed, "PASS"), **dict.fromkeys(skipped, "SKIP")}
    figures = json.loads(out.read_text())
    assert figures["environment"]["smoke"] is True
    assert [c["status"] for c in figures["checks"]].count("PASS") == len(passed)
    assert max(figures["figures"]["reference_relative_error"].values()) <= 1e-3


def test_a_failed_check_fails_the_run(capsys):
    report = gpu_check.Report(device="cpu")
    report.check("one", True, "fine")
    report.check("two", None, "needs CUDA")
    assert not report.failed
    report.check("three", False, "wrong")
    assert report.failed
    assert capsys.readouterr().out.splitlines() == [
        "PASS one: fine", "SKIP two: needs CUDA", "FAIL three: wrong"
    ]  # fmt: skip
