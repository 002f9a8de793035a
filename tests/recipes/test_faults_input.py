"""Fault injection for ``hiftune train``: non-finite training, full disks, unusable paths, bad input.

Each test reproduces one fault of issue 13 (items 4, 8 and 10) on the tiny models and checks that
it ends in one line (exit 2) that says what happened, and that nothing broken or partial is left
where a later run would trust it.
"""

from __future__ import annotations

import errno
import gzip
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

from hiftune import HiFTOptimizer
from hiftune.cli import main
from hiftune.recipes import data as D
from hiftune.recipes import safe_io
from hiftune.recipes.config import TrainRecipeConfig, build_config
from hiftune.recipes.guards import NonFiniteGuard
from hiftune.recipes.launch import resume_command
from hiftune.recipes.tasks import PromptClsTask

CLS = ["--text-field", "sentence", "--label-field", "sentiment"]
FAST = ["--batch-size", "4", "--eval-batch-size", "8", "--units-per-group", "1", "--no-zero-shot"]
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def train(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main(["train", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *parts: str) -> str:
    """The one error line of a failed run, checked to contain ``parts``."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("hiftune train: error:")]
    assert len(lines) == 1, err
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def run_args(model: Path, data: Path, out: Path, *extra: str) -> list[str | Path]:
    return ["--model", model, "--data", data, *CLS, *FAST, "--output-dir", out, *extra]


class Runs:
    """``hiftune train`` on the tiny llama and the small sentiment file, into ``out``."""

    def __init__(self, capsys: pytest.CaptureFixture[str], model: Path, data: Path, out: Path):
        self.capsys, self.model, self.data, self.out = capsys, model, data, out

    def __call__(self, *extra: str | Path, out: Path | None = None) -> tuple[int, str, str]:
        args = run_args(self.model, self.data, self.out if out is None else out)
        return train(self.capsys, *args, *extra)


@pytest.fixture
def runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_llama: Path, cls_jsonl: Path
) -> Runs:
    return Runs(capsys, tiny_llama, cls_jsonl, tmp_path / "run")


# --- item 4: non-finite loss or gradient norm ---------------------------------------------------


def test_nan_loss_stops_at_its_step_and_is_reported_as_nan(
    runs: Runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = PromptClsTask.compute_loss

    def nan_loss(self, outputs, labels, num_items_in_batch=None):
        return real(self, outputs, labels, num_items_in_batch) * float("nan")

    monkeypatch.setattr(PromptClsTask, "compute_loss", nan_loss)
    out = runs.out
    code, _, err = runs("--max-steps", "3")
    # The Trainer's nan filter would have logged this loss as 0.0 (and the run exit 0).
    one_line_error(code, err, "training loss is nan at step 1", "learning rate")
    assert "loss=nan" in err  # the progress bar shows it as it is
    assert not (out / "model.safetensors").exists() and not (out / "report.json").exists()


def test_diverging_learning_rate_keeps_only_finite_checkpoints(runs: Runs) -> None:
    out = runs.out
    code, _, err = runs(
        *["--max-steps", "4", "--save-steps", "1"],
        *["--lr", "1e38", "--optimizer", "sgd", "--max-grad-norm", "0"],
    )
    one_line_error(code, err, "is nan at step 2", "learning rate (1e+38) is likely too high")
    assert not (out / "model.safetensors").exists() and not (out / "report.json").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    weights = load_file(out / "checkpoint-1" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_learning_rate_that_kills_the_model_is_reported_not_saved(
    runs: Runs, precision: str
) -> None:
    # --lr 1e6 saturates the model after a step: the same loss at every step, no gradient at all.
    # It exited 0 and saved the dead model as the result.
    out = runs.out
    code, _, err = runs("--max-steps", "12", "--lr", "1e6", "--precision", precision)
    one_line_error(
        code, err, "training diverged: the gradient norm has been exactly 0", "--lr 1e+06"
    )
    assert not (out / "model.safetensors").exists() and not (out / "report.json").exists()


def test_fp16_divergence_is_one_line(runs: Runs) -> None:
    # It was a FloatingPointError traceback from the optimizer's step.
    code, _, err = runs("--max-steps", "3", "--lr", "1e6", "--precision", "fp16")
    one_line_error(code, err, "training diverged", "lower the learning rate")
    assert not (runs.out / "model.safetensors").exists()


def test_guard_ignores_the_gradient_norm_of_an_fp16_overflow_step() -> None:
    class Hift(HiFTOptimizer):  # only what the guard reads: the skipped steps, the cycle
        skipped_steps = 0
        steps_per_cycle = 1

        def __init__(self) -> None:
            pass

    class Control:
        should_training_stop = should_save = False

    class State:
        global_step = 1

    args = SimpleNamespace(learning_rate=1e-3)
    hift, guard, control = Hift(), NonFiniteGuard(), Control()
    hift.skipped_steps = 1  # the loss scaler skipped this step: inf gradients are expected
    logs = {"loss": 1.0, "grad_norm": math.inf, "learning_rate": 1e-3}
    guard.on_log(args, State(), control, logs=logs, optimizer=hift)
    assert guard.failure is None and not control.should_training_stop
    guard.on_log(args, State(), control, logs=logs, optimizer=hift)  # not skipped this time
    assert "gradient norm is inf at step 1" in guard.failure
    assert control.should_training_stop and not control.should_save


# --- item 8: full disks and unusable output directories -----------------------------------------


def test_output_dir_that_is_a_file_or_read_only_is_refused_before_loading(
    runs: Runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output directory was checked")

    monkeypatch.setattr("hiftune.recipes.train.load_model_and_tokenizer", no_loading)
    code, _, err = runs(out=runs.data)
    one_line_error(code, err, f"--output-dir {runs.data} is a file")
    code, _, err = runs(out=runs.data / "sub")
    one_line_error(code, err, "Not a directory")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(safe_io.tempfile, "TemporaryFile", read_only)
    out = runs.out
    code, _, err = runs()
    one_line_error(code, err, f"--output-dir {out} is not writable: Read-only file system")
    assert not out.exists()  # the check leaves no empty directory behind


@pytest.mark.parametrize("fault", ["oserror", "torch-zip-writer"])
def test_full_disk_during_a_checkpoint_removes_it_and_names_the_last_good_one(
    runs: Runs, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("checkpoint-2/optimizer.pt"):
            Path(f).write_bytes(b"partial")  # what a full disk leaves
            if fault == "oserror":
                raise ENOSPC
            # torch's zip writer loses the errno: only the free space tells
            monkeypatch.setattr(safe_io, "_free_bytes", lambda path: 0)
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = runs.out
    code, _, err = runs("--max-steps", "3", "--save-steps", "1")
    one_line_error(
        code,
        err,
        f"cannot write {out / 'checkpoint-2'} after step 2: No space left on device",
        "partial checkpoint was removed",
        f"--resume {out / 'checkpoint-1'}",
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]


def test_full_disk_between_checkpoints_names_the_file_and_keeps_the_checkpoints(
    runs: Runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_step = HiFTOptimizer.step
    paged = runs.out.parent / "state" / "group-1.safetensors"

    def step(self, closure=None):
        if self.cycle == 0 and self.active_group == 2:  # the third step pages state out
            raise RuntimeError(f"cannot write {paged}") from OSError(
                errno.ENOSPC, "No space left on device", str(paged)
            )
        return real_step(self, closure)

    monkeypatch.setattr(HiFTOptimizer, "step", step)
    code, _, err = runs("--max-steps", "3", "--save-steps", "1")
    one_line_error(code, err, f"cannot write {paged} after step 2: No space left on device")
    assert "removed" not in err
    assert sorted(p.name for p in runs.out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_full_disk_at_the_final_save_leaves_no_partial_model_and_keeps_the_checkpoint(
    runs: Runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save_model = Trainer.save_model

    def save_model(self, output_dir=None, _internal_call=False):
        if _internal_call:  # a checkpoint: let it through
            return real_save_model(self, output_dir, _internal_call)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
        raise ENOSPC

    monkeypatch.setattr(Trainer, "save_model", save_model)
    out = runs.out
    code, _, err = runs("--max-steps", "2", "--save-steps", "2")
    last = out / "checkpoint-2"
    one_line_error(
        code,
        err,
        f"cannot save the fine-tuned model to {out}: No space left on device",
        f"the last checkpoint {last} is kept: resume with {resume_command(last)}",
    )
    assert not (out / "model.safetensors").exists() and not (out / "report.json").exists()
    assert not list(out.glob(".final*")) and (last / "model.safetensors").is_file()

    monkeypatch.setattr(Trainer, "save_model", real_save_model)  # space freed: resume
    code, _, err = train(runs.capsys, "--resume", last)
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and (out / "report.json").is_file()


def test_full_disk_while_writing_the_report_removes_the_partial_report(
    runs: Runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    def write_json(path, obj):
        Path(path).write_text("{")
        raise ENOSPC

    monkeypatch.setattr("hiftune.recipes.report.write_json", write_json)
    out = runs.out
    code, _, err = runs("--max-steps", "1")
    one_line_error(code, err, f"cannot write the report in {out}: No space left on device")
    assert not (out / "report.json").exists()
    assert (out / "model.safetensors").is_file()  # the model was saved before


def test_only_write_failures_become_write_errors() -> None:
    assert safe_io.is_write_failure(ENOSPC)
    wrapped = RuntimeError("cannot write optimizer state")
    wrapped.__cause__ = ENOSPC
    assert safe_io.is_write_failure(wrapped)
    assert safe_io.write_failure_reason(wrapped, Path(".")) == "No space left on device"
    assert not safe_io.is_write_failure(RuntimeError("shape mismatch"))
    assert not safe_io.is_write_failure(KeyError("x"))


# --- item 10: inputs ----------------------------------------------------------------------------


def test_integral_labels_are_one_class_however_written(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    labels = [0, 1, 0.0, 1.0, "1.0", True, False, " 0 "]
    path.write_text("".join(json.dumps({"t": "a film", "y": y}) + "\n" for y in labels))
    records = D.select_fields(D.read_records(path), {"text": "t", "label": "y"}, str(path))
    encoded, classes = D.encode_labels(records)
    assert classes == ["0", "1"]
    assert [r["label"] for r in encoded] == [0, 1, 0, 1, 1, 1, 0, 0]
    assert D.encode_labels([{"label": 2.5}, {"label": "x"}])[1] == ["2.5", "x"]


@pytest.mark.parametrize("empty", ["", "  ", None])
def test_an_empty_label_is_an_error_not_a_class(tmp_path: Path, empty: object) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"t": "a film", "y": 1}, {"t": "a movie", "y": empty}, {"t": "the plot", "y": 0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(D.DataError, match=r"a record with an empty 'y' \(--label-field\)"):
        D.select_fields(D.read_records(path), {"text": "t", "label": "y"}, str(path))
    with pytest.raises(D.DataError, match="record 2 has an empty label"):
        D.encode_labels([{"label": 1}, {"label": " "}, {"label": 0}])


def test_csv_with_a_byte_order_mark_keeps_its_field_names(tmp_path: Path) -> None:
    for name, write in (("bom.csv", Path.write_bytes), ("bom.csv.gz", None)):
        path = tmp_path / name
        body = "\ufefftext,label\na film,1\n".encode()
        if write is None:
            path.write_bytes(gzip.compress(body))
        else:
            write(path, body)
        assert D.read_records(path) == [{"text": "a film", "label": "1"}]
    path = tmp_path / "bom.jsonl"
    path.write_bytes('\ufeff{"text": "a film"}\n'.encode())
    assert D.read_records(path) == [{"text": "a film"}]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"text,label\na,1\n", "is not a valid gzip file"),
        (gzip.compress(b"text,label\na,1\n")[:-12], "is not a valid gzip file"),
        (
            gzip.compress("text,label\ncaf\xe9,1\n".encode("latin-1")),
            r"d\.csv\.gz: line 2 \(gunzipped\) is not UTF-8",
        ),
    ],
    ids=["not-gzip", "truncated", "not-utf8"],
)
def test_bad_gz_files_are_one_line(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "d.csv.gz"
    path.write_bytes(content)
    with pytest.raises(D.DataError, match=match):
        D.read_records(path)


def test_yaml_numbers_written_as_text_are_numbers(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"  # docs/train.md's example: YAML reads 1e-4 as a string
    path.write_text("lr: 1e-4\nepochs: 1\nunits_per_group: 2\nmax_steps: '10'\nwarmup_ratio: .1\n")
    cfg = build_config({"config": str(path)})
    assert (cfg.lr, cfg.epochs, cfg.units_per_group, cfg.max_steps) == (1e-4, 1, 2, 10)
    assert isinstance(cfg.lr, float) and cfg.warmup_ratio == 0.1
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        TrainRecipeConfig(batch_size="2.5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr must be a positive number"):
        TrainRecipeConfig(lr="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--epochs", "inf"], "epochs must be a finite number > 0, got inf"),
        (["--task", "seq-cls", "--label-words", "bad,good"], "label_words is for task prompt-cls"),
        (["--units-per-group", "100"], "--units-per-group 100 is more than the 4 units"),
        (["--max-length", "100000"], "--max-length 100000 is longer than"),
    ],
    ids=["epochs-inf", "label-words-seq-cls", "units-per-group", "max-length"],
)
def test_bad_option_values_are_one_line(runs: Runs, argv: list[str], match: str) -> None:
    # The later --units-per-group wins over the one in FAST.
    code, _, err = runs(*argv)
    one_line_error(code, err, match)
