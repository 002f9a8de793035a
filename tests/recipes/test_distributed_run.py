"""``hiftune train`` under torchrun: 2 gloo processes on CPU against one process.

Both runs train on the same global batch: 16 rows per optimizer step, as 8 rows x 2 accumulated
micro-batches in one process, or 4 rows x 2 micro-batches on each of 2 processes. The task is sft
(the model's own token loss, which the Trainer normalises over all processes' tokens) and the 32
training rows are a whole number of steps, so the shuffled epochs line up too: 8 steps are 4
epochs and two HiFT cycles of 4 groups.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed.launch import launch
from hiftune.cli import main

pytestmark = pytest.mark.slow

WORLD = 2
STEPS = 8


def _args(model: Path, data: Path) -> list[str]:
    return [
        "train", "--model", str(model), "--task", "sft", "--data", str(data),
        "--prompt-field", "question", "--response-field", "answer", "--train-samples", "32",
        "--max-steps", str(STEPS), "--grad-accum", "2", "--units-per-group", "1", "--lr", "1e-2",
        "--eval-batch-size", "8", "--no-zero-shot",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """A tiny llama, 40 prompt/answer rows, and a script that runs the ``hiftune`` command."""
    from recipes.conftest import make_llama, sentiment_records

    root = tmp_path_factory.mktemp("distributed-run")
    model = make_llama(root / "model")
    data = root / "sft.jsonl"
    rows = [
        {"question": f"review : {r['sentence']}", "answer": r["sentiment"]}
        for r in sentiment_records(40)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = root / "hiftune_cli.py"
    script.write_text("from hiftune.cli import main\n\nraise SystemExit(main())\n")
    return script, root, _args(model, data)


@pytest.fixture(scope="module")
def one_process(setup: tuple[Path, Path, list[str]]) -> Path:
    """The reference: one process, 8 rows per micro-batch."""
    _, root, args = setup
    out = root / "one"
    assert main([*args, "--batch-size", "8", "--output-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def torchrun_run(setup: tuple[Path, Path, list[str]]) -> tuple[Path, str]:
    """``torchrun --nproc-per-node 2 hiftune train``, 4 rows per process, a checkpoint mid-cycle."""
    script, root, args = setup
    out = root / "two"
    done = launch(script, *args, "--batch-size", "4", "--save-steps", "6", "--output-dir", str(out))
    return out, done.stdout


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def _assert_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], **tol: float) -> None:
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], msg=name, **tol)


def test_torchrun_equals_one_process_and_writes_once(
    one_process: Path, torchrun_run: tuple[Path, str]
) -> None:
    out, stdout = torchrun_run
    _assert_close(_weights(out), _weights(one_process), atol=1e-5, rtol=1e-4)
    report, ref = (json.loads((d / "report.json").read_text()) for d in (out, one_process))
    assert report["steps"] == STEPS and report["hift_cycles"] == 2
    # The logged loss is the mean over both processes: one process's on the whole batch.
    losses = [s["loss"] for s in report["per_step"]]
    assert losses == pytest.approx([s["loss"] for s in ref["per_step"]], rel=1e-5)
    assert report["final"]["loss"] == pytest.approx(ref["final"]["loss"], rel=1e-5)
    # The main process alone printed the plan and the outcome, and wrote the checkpoint's own
    # files (the run file and, last, the checksum manifest) once the Trainer had saved it.
    assert stdout.count("plan: HiFT") == 1 and stdout.count("fine-tuned: loss") == 1
    checkpoint = out / "checkpoint-6"
    assert (checkpoint / "hiftune_run.json").is_file()
    manifest = json.loads((checkpoint / "hiftune_manifest.json").read_text())
    assert "optimizer.pt" in json.dumps(manifest)
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {
        f"rng_state_{r}.pth" for r in range(WORLD)
    }


def test_resume_under_torchrun_is_exact(
    setup: tuple[Path, Path, list[str]], torchrun_run: tuple[Path, str]
) -> None:
    # The rest of the configuration comes from the checkpoint; every process loads it.
    script, root, _ = setup
    out, _ = torchrun_run
    resumed = root / "resumed"
    launch(script, "train", "--resume", str(out / "checkpoint-6"), "--output-dir", str(resumed))
    report = json.loads((resumed / "report.json").read_text())
    # The report covers the whole run, the 6 steps before the resume included (issue 21, item 2).
    assert [s["step"] for s in report["per_step"]] == list(range(1, 9))
    _assert_close(_weights(resumed), _weights(out), atol=1e-6, rtol=1e-5)


def test_a_refused_output_dir_stops_every_process_with_one_line(
    setup: tuple[Path, Path, list[str]], torchrun_run: tuple[Path, str]
) -> None:
    # Only the main process checks the directory; the other one must stop with its error too,
    # not wait for it in the first collective.
    script, _, args = setup
    out, _ = torchrun_run
    with pytest.raises(AssertionError) as failed:
        launch(script, *args, "--batch-size", "4", "--output-dir", str(out))
    text = str(failed.value)
    # (The processes share the terminal: their lines may run into each other.)
    assert text.count(f"hiftune train: error: --output-dir {out} holds another run") == WORLD
    assert "/hiftune/recipes/" not in text  # no traceback of ours (torchrun prints its own)
    # torchrun's account of each process: exit code 2, except that torchrun ends the others as
    # soon as one process has exited with an error, which may catch one after it printed its line.
    codes = [int(c) for c in re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", text, re.MULTILINE)]
    assert len(codes) == WORLD and 2 in codes and set(codes) <= {2, -signal.SIGTERM}, text
