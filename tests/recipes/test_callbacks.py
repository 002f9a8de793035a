"""The recipe's callbacks: the evaluation's progress bar (the training bar, per-step log and
interrupts are exercised by test_train.py and test_faults_run.py)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from hiftune.cli import main
from hiftune.recipes.callbacks import Progress


def evaluate(progress: Progress, batches: int, main_process: bool = True) -> None:
    """What ``Trainer.evaluate`` tells its callbacks about an evaluation of ``batches`` batches."""
    args, control = SimpleNamespace(), SimpleNamespace()
    state = SimpleNamespace(is_world_process_zero=main_process)
    loader = list(range(batches))
    for _ in loader:
        progress.on_prediction_step(args, state, control, eval_dataloader=loader)
    progress.on_evaluate(args, state, control, metrics={})


def test_each_evaluation_counts_its_batches(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress({})
    evaluate(progress, 3)
    evaluate(progress, 5)  # a second evaluation starts a bar of its own
    err = capsys.readouterr().err
    assert re.search(r"eval: 100%.*\| 3/3 ", err) and re.search(r"eval: 100%.*\| 5/5 ", err)
    evaluate(progress, 3, main_process=False)  # one bar for the run, the main process's
    assert capsys.readouterr().err == ""


def test_the_zero_shot_and_final_evaluations_are_not_silent(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_llama: Path, cls_jsonl: Path
) -> None:
    # make run's zero-shot evaluation ran for minutes without a line of output.
    data = ["--data", str(cls_jsonl), "--text-field", "sentence", "--label-field", "sentiment"]
    out = ["--output-dir", str(tmp_path / "run")]
    code = main(["train", "--model", str(tiny_llama), *data, "--max-steps", "1", *out])
    err = capsys.readouterr().err
    assert code == 0, err
    # the 4 held-out examples in one batch, before training and after
    assert len(re.findall(r"eval: 100%.*\| 1/1 ", err)) == 2
