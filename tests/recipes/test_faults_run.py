"""Faults of a ``hiftune train`` run: preemption signals, moved runs, shared output directories,
finished runs resumed, and corrupt checkpoints. Tiny models on the CPU, a few seconds each."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hiftune.cli import main
from hiftune.recipes.callbacks import Progress
from recipes.test_train import assert_one_line_error, run_cli

CLS = ["--text-field", "sentence", "--label-field", "sentiment"]
# Six steps over four groups (embed, two blocks, head): a resume lands mid-cycle.
RUN = [
    *CLS, "--batch-size", "4", "--max-steps", "6", "--lr", "1e-2", "--no-zero-shot",
    "--seed", "3", "--units-per-group", "1", "--eval-samples", "8", "--eval-batch-size", "8",
]  # fmt: skip


def assert_same_weights(a: Path, b: Path) -> None:
    """Bit-identical ``model.safetensors`` files (tensor by tensor)."""
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


def signal_at(monkeypatch: pytest.MonkeyPatch, step: int, signum: int = signal.SIGINT) -> None:
    """Sends ``signum`` to this process during optimizer step ``step``."""
    original = Progress.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == step:
            os.kill(os.getpid(), signum)
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(Progress, "on_step_end", on_step_end)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """The model of an uninterrupted run of :data:`RUN` (and its data file)."""
    root = tmp_path_factory.mktemp("straight")
    data = root / "cls.jsonl"
    from recipes.conftest import sentiment_records

    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_records()))
    assert main(["train", "--model", str(tiny_llama), "--data", str(data), *RUN,
                 "--output-dir", str(root / "run")]) == 0  # fmt: skip
    return root


def base_args(tiny_llama: Path, straight: Path) -> list[str | Path]:
    return ["--model", tiny_llama, "--data", straight / "cls.jsonl", *RUN]


# --- 1. SIGTERM and SIGHUP: checkpoint, print the resume command, exit 128 + signal --------------

# Runs `hiftune train` and holds it at a known point until a stop signal has been handled: at
# optimizer step HOLD=<n>, or in the zero-shot evaluation (HOLD=eval, before training begins). A
# process that the signal kills never gets past it.
WRAPPER = """
import os, sys, time
from pathlib import Path
from hiftune.cli import main
from hiftune.recipes.callbacks import Progress
from hiftune.recipes.train import Recipe

hold = os.environ["HOLD"]
on_step_end = Progress.on_step_end

def held_step_end(self, args, state, control, **kwargs):
    if str(state.global_step) == hold:
        Path(os.environ["READY"]).write_text("ready")
        deadline = time.monotonic() + 120  # a safety net only: the signal ends the wait
        while not self.interrupt.requested and time.monotonic() < deadline:
            time.sleep(0.01)
    return on_step_end(self, args, state, control, **kwargs)

def held_evaluate(self, *args, **kwargs):
    Path(os.environ["READY"]).write_text("ready")
    time.sleep(120)  # a safety net only: the signal ends the wait

Progress.on_step_end = held_step_end
if hold == "eval":
    Recipe._evaluate = held_evaluate
sys.exit(main(sys.argv[1:]))
"""


def signal_held_run(
    tmp_path: Path, argv: list[str | Path], hold: str, signum: int
) -> tuple[int, str, str]:
    """Runs ``hiftune train argv`` in a subprocess held at ``hold`` (see :data:`WRAPPER`), sends
    it ``signum`` there; returns its exit code, stdout and stderr."""
    script, ready = tmp_path / "wrapper.py", tmp_path / "ready"
    script.write_text(WRAPPER)
    proc = subprocess.Popen(
        [sys.executable, str(script), "train", *map(str, argv)],
        env={**os.environ, "HOLD": hold, "READY": str(ready)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not ready.exists() and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc.returncode, out, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_preemption_signal_checkpoints_and_resumes_bit_identical(
    capsys, tmp_path: Path, tiny_llama: Path, straight: Path, signum: int
) -> None:
    out_dir = tmp_path / "cut"
    argv = [*base_args(tiny_llama, straight), "--output-dir", out_dir]
    code, out, err = signal_held_run(tmp_path, argv, "2", signum)
    assert code == 128 + signum, err
    ckpt = out_dir / "checkpoint-2"
    assert "Traceback" not in err

    code, _, err = run_cli(capsys, *printed_resume_command(out, ckpt))
    assert code == 0, err
    assert json.loads((out_dir / "report.json").read_text())["steps"] == 6
    assert_same_weights(out_dir / "model.safetensors", straight / "run" / "model.safetensors")


def printed_resume_command(out: str, checkpoint: Path) -> list[str]:
    """The arguments of the resume command in ``out``, checked to start a hiftune that the shell
    finds from here (the current directory, this process's ``PATH``)."""
    [line] = [line for line in out.splitlines() if line.startswith("resume with: ")]
    program, *args = shlex.split(line.removeprefix("resume with: "))
    assert args == ["train", "--resume", str(checkpoint)], line
    found = shutil.which(program)  # a name on the PATH, or a path from the current directory
    assert found is not None, f"{line!r}: the shell finds no {program}"
    assert Path(found).resolve() == (Path(sysconfig.get_path("scripts")) / "hiftune").resolve()
    return args[1:]


def test_the_printed_resume_command_works_under_make_run(
    capsys, monkeypatch, tmp_path: Path, tiny_llama: Path, straight: Path
) -> None:
    # make run starts .venv/bin/hiftune by its path, from the project, with no venv activated.
    scripts = Path(sysconfig.get_path("scripts"))
    monkeypatch.chdir(scripts.parent.parent)
    monkeypatch.setattr(sys, "argv", [os.path.relpath(scripts / "hiftune"), "train"])
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.defpath.split(os.pathsep) if p))
    assert shutil.which("hiftune") is None
    out_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        signal_at(m, 2)
        code, out, _ = run_cli(capsys, *base_args(tiny_llama, straight), "--output-dir", out_dir)
    assert code == 130
    assert f"resume with: {os.path.relpath(scripts / 'hiftune')} train --resume " in out
    code, _, err = run_cli(capsys, *printed_resume_command(out, out_dir / "checkpoint-2"))
    assert code == 0, err
    assert_same_weights(out_dir / "model.safetensors", straight / "run" / "model.safetensors")


def test_sigterm_before_training_aborts_like_ctrl_c(
    tmp_path: Path, tiny_llama: Path, straight: Path
) -> None:
    out_dir = tmp_path / "run"
    with_zero_shot = [a for a in base_args(tiny_llama, straight) if a != "--no-zero-shot"]
    argv = [*with_zero_shot, "--output-dir", out_dir]
    code, _, err = signal_held_run(tmp_path, argv, "eval", signal.SIGTERM)
    assert code == 130 and "hiftune train: interrupted" in err and "Traceback" not in err, err
    assert not out_dir.exists()  # the clean-up ran: nothing was written yet, nothing is left


# --- 2. a moved or copied run resumes where it is now -------------------------------------------


@pytest.mark.parametrize("how", ["move", "copy"])
def test_resume_of_a_moved_or_copied_run_writes_where_it_is(
    capsys, monkeypatch, tmp_path: Path, tiny_llama: Path, straight: Path, how: str
) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    with monkeypatch.context() as m:
        signal_at(m, 3)
        code, _, _ = run_cli(capsys, *base_args(tiny_llama, straight), "--output-dir", old)
    assert code == 130
    (shutil.move if how == "move" else shutil.copytree)(old, new)
    before = sorted(p.relative_to(old) for p in old.rglob("*")) if old.exists() else []

    code, out, err = run_cli(capsys, "--resume", new)
    assert code == 0, err
    assert str(new) in out and (new / "report.json").is_file()
    assert_same_weights(new / "model.safetensors", straight / "run" / "model.safetensors")
    # The old directory is neither recreated nor written to.
    assert (sorted(p.relative_to(old) for p in old.rglob("*")) if old.exists() else []) == before
    assert json.loads((new / "report.json").read_text())["output_dir"] == str(new)


# --- 3. one run per output directory ------------------------------------------------------------


def test_a_second_run_on_a_busy_output_directory_is_refused(
    capsys, monkeypatch, tmp_path: Path, tiny_llama: Path, straight: Path
) -> None:
    args = [*base_args(tiny_llama, straight), "--output-dir", tmp_path / "run"]
    second: list[tuple[int, str]] = []
    original = Progress.on_step_end

    def on_step_end(self, a, state, control, **kwargs):  # another run starts while this one runs
        if state.global_step == 1:
            second.append(
                (main(["train", *map(str, args), "--seed", "4"]), capsys.readouterr().err)
            )
        return original(self, a, state, control, **kwargs)

    monkeypatch.setattr(Progress, "on_step_end", on_step_end)
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    [(code, err)] = second
    assert_one_line_error(code, err, "is in use by another hiftune train run")
    assert f"pid {os.getpid()}" in err
    assert_same_weights(
        tmp_path / "run" / "model.safetensors", straight / "run" / "model.safetensors"
    )


def test_an_output_directory_holding_another_run_is_refused_unless_overwritten(
    capsys, tmp_path: Path, tiny_llama: Path, straight: Path
) -> None:
    out_dir = tmp_path / "run"
    args = [*base_args(tiny_llama, straight), "--output-dir", out_dir]
    code, _, err = run_cli(capsys, *args, "--seed", "4", "--save-steps", "2")
    assert code == 0, err
    assert (out_dir / "checkpoint-6").is_dir()

    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "holds another run")
    code, _, err = run_cli(
        capsys, *args, "--overwrite-output-dir", "--max-steps", "4", "--save-steps", "4"
    )
    assert code == 0, err
    # Nothing of the first run is left to resume or to be taken for the second run's result.
    assert sorted(p.name for p in out_dir.glob("checkpoint-*")) == ["checkpoint-4"]
    assert json.loads((out_dir / "report.json").read_text())["config"]["seed"] == 3


def test_a_failed_start_leaves_no_output_directory(
    capsys, tmp_path: Path, tiny_llama: Path, straight: Path
) -> None:
    out_dir = tmp_path / "run"  # the label words are checked after the directory is taken
    args = [*base_args(tiny_llama, straight), "--label-words", "bad,dull,good"]
    code, _, err = run_cli(capsys, *args, "--output-dir", out_dir)
    assert_one_line_error(code, err, "3 label words")
    assert not out_dir.exists()


# --- 7. a finished run resumed trains no extra step ---------------------------------------------


def test_resuming_a_finished_run_goes_straight_to_evaluation(
    capsys, tmp_path: Path, tiny_llama: Path, straight: Path
) -> None:
    out_dir = tmp_path / "run"
    args = [*base_args(tiny_llama, straight), "--scheduler", "constant", "--save-steps", "6"]
    code, _, err = run_cli(capsys, *args, "--output-dir", out_dir)
    assert code == 0, err
    first = json.loads((out_dir / "report.json").read_text())
    for _ in range(2):  # and again: no resume adds a step
        code, _, err = run_cli(capsys, "--resume", out_dir)
        assert code == 0, err
        report = json.loads((out_dir / "report.json").read_text())
        # The report still covers the run's steps, all trained before the resume.
        assert report["steps"] == 6 and report["per_step"] == first["per_step"]
        assert report["train_loss"] == pytest.approx(first["train_loss"], rel=1e-9)
        assert_same_weights(
            out_dir / "model.safetensors", out_dir / "checkpoint-6" / "model.safetensors"
        )


# --- 9. corrupt checkpoints: verified on resume, the last good one is taken ---------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_last_byte(path: Path) -> None:  # the end of a safetensors file is tensor data
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {
    "trainer_state.json": _truncate,
    "trainer_state.json empty": lambda p: p.write_text(""),
    "optimizer.pt": _truncate,
    "rng_state.pth": lambda p: p.write_bytes(b"\0" * p.stat().st_size),
    "model.safetensors": _truncate,
    "model.safetensors flipped": _flip_last_byte,
    "hiftune_manifest.json": lambda p: p.unlink(),  # a save that did not finish
}


@pytest.fixture(scope="module")
def two_checkpoints(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, straight: Path
) -> Path:
    """A run of :data:`RUN` stopped at step 4 with checkpoints at steps 2 and 4."""
    out_dir = tmp_path_factory.mktemp("two") / "run"
    args = [*map(str, base_args(tiny_llama, straight)), "--save-steps", "2"]
    with pytest.MonkeyPatch.context() as m:
        signal_at(m, 4)
        assert main(["train", *args, "--output-dir", str(out_dir)]) == 130
    return out_dir


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_corrupt_checkpoint_falls_back_to_the_previous_good_one(
    capsys, caplog, tmp_path: Path, two_checkpoints: Path, straight: Path, damage: str
) -> None:
    out_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, out_dir)
    bad = out_dir / "checkpoint-4" / damage.split()[0]
    DAMAGE[damage](bad)

    # Named directly: one line naming the file and the previous good checkpoint.
    code, _, err = run_cli(capsys, "--resume", out_dir / "checkpoint-4")
    assert_one_line_error(code, err, str(bad))
    assert f"the previous good checkpoint is {out_dir / 'checkpoint-2'}" in err

    # The run directory: its last good checkpoint, and the run ends as if nothing had happened.
    code, _, err = run_cli(capsys, "--resume", out_dir)
    assert code == 0, err
    [warning] = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert warning.startswith(f"skipping checkpoint-4: {bad}") and "from checkpoint-2" in warning
    assert_same_weights(out_dir / "model.safetensors", straight / "run" / "model.safetensors")


def test_a_run_without_a_good_checkpoint_is_one_line(
    capsys, tmp_path: Path, two_checkpoints: Path
) -> None:
    out_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, out_dir)
    for step in (2, 4):
        _flip_last_byte(out_dir / f"checkpoint-{step}" / "optimizer.pt")
    code, _, err = run_cli(capsys, "--resume", out_dir)
    assert_one_line_error(code, err, "no good checkpoint (checkpoint-4:")
    code, _, err = run_cli(capsys, "--resume", out_dir / "checkpoint-2")
    assert_one_line_error(code, err, "no earlier checkpoint is good")


def test_checkpoints_without_manifests_are_still_checked(
    tmp_path: Path, two_checkpoints: Path
) -> None:
    from hiftune.recipes.checkpoints import MANIFEST, find_checkpoint

    out_dir = tmp_path / "run"  # as written before checkpoints had manifests
    shutil.copytree(two_checkpoints, out_dir)
    for manifest in out_dir.glob(f"checkpoint-*/{MANIFEST}"):
        manifest.unlink()
    assert find_checkpoint(out_dir) == out_dir / "checkpoint-4"
    (out_dir / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "log_hi')
    assert find_checkpoint(out_dir) == out_dir / "checkpoint-2"
