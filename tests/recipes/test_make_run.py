"""``make run`` resumes an interrupted demo run and never removes one; a finished run is replaced.

Dry runs (``make -n``): the command ``make run`` would start, for each state of its directory.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def make_run_command(run_dir: Path) -> list[str]:
    """The ``hiftune train`` command ``make run`` would start on ``run_dir``."""
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", "run", f"RUN_DIR={run_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    [line] = [line for line in out.splitlines() if "hiftune train" in line]
    return shlex.split(line)[1:]


def test_a_new_directory_starts_a_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert make_run_command(run_dir) == [
        "train", "--output-dir", str(run_dir), "--overwrite-output-dir"
    ]  # fmt: skip


def test_an_interrupted_run_is_resumed_not_removed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint-2").mkdir(parents=True)
    (run_dir / "hiftune_run.json").write_text("{}")
    assert make_run_command(run_dir) == [
        "train", "--output-dir", str(run_dir), "--resume", str(run_dir)
    ]  # fmt: skip


def test_a_finished_run_is_replaced(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint-6").mkdir(parents=True)
    (run_dir / "report.json").write_text("{}")
    assert make_run_command(run_dir) == [
        "train", "--output-dir", str(run_dir), "--overwrite-output-dir"
    ]  # fmt: skip


def test_its_command_resumes_an_interrupted_run(
    capsys, monkeypatch, tmp_path: Path, tiny_llama: Path, cls_jsonl: Path
) -> None:
    from recipes.test_faults_run import CLS, signal_at
    from recipes.test_train import run_cli

    run_dir = tmp_path / "run"
    args = [
        "--model", tiny_llama, "--data", cls_jsonl, *CLS, "--batch-size", "4", "--max-steps", "4",
        "--no-zero-shot", "--eval-samples", "8", "--units-per-group", "1",
    ]  # fmt: skip
    with monkeypatch.context() as m:
        signal_at(m, 2)
        assert run_cli(capsys, *args, "--output-dir", run_dir)[0] == 130
    code, _, err = run_cli(capsys, *make_run_command(run_dir)[1:])
    assert code == 0, err
    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"] == 4 and [s["step"] for s in report["per_step"]] == [1, 2, 3, 4]
    assert (run_dir / "checkpoint-2").is_dir()  # the interrupted run's checkpoint is kept
