"""``hiftune train`` end to end on tiny models: tasks, methods, optimizers, reports, errors, resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from hiftune.cli import main
from hiftune.engine.optimizers import resolve_optimizer
from hiftune.recipes import report as report_module
from hiftune.recipes.callbacks import Progress
from hiftune.recipes.config import TrainRecipeConfig

CLS = ["--text-field", "sentence", "--label-field", "sentiment"]
FAST = ["--batch-size", "4", "--max-steps", "4", "--eval-batch-size", "8", "--units-per-group", "1"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main(["train", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, match: str) -> None:
    assert code == 2
    # (A run started during another one prints its error after that one's progress bar.)
    lines = [line.partition("hiftune train: error:")[2] for line in err.splitlines()]
    lines = [line for line in lines if line]
    assert len(lines) == 1, err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("method", ["hift", "fpft"])
def test_prompt_cls_end_to_end(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tiny_llama: Path,
    cls_jsonl: Path,
    method: str,
) -> None:
    out_dir = tmp_path / "run"
    code, out, _ = run_cli(
        capsys, "--model", tiny_llama, "--data", cls_jsonl, *CLS, *FAST,
        "--method", method, "--lr", "1e-2", "--output-dir", out_dir,
    )  # fmt: skip
    assert code == 0
    assert "zero-shot:  accuracy" in out and "fine-tuned: accuracy" in out and str(out_dir) in out
    # The plan comes first, before training: units, groups, estimated memory.
    assert out.index("plan: ") < out.index("fine-tuned:")
    assert "units: 4 (embed, layers.0-1, head)" in out and "HiFT" in out and "vs FPFT" in out
    report = json.loads((out_dir / "report.json").read_text())
    assert report["steps"] == 4 and report["method"] == method
    assert report["plan"]["groups"] == ["embed", "layers.0", "layers.1", "head"]
    assert report["plan"]["hift"]["total"] < report["plan"]["fpft"]["total"]
    assert report["samples"] is None  # classification: nothing to generate
    assert 0 <= report["zero_shot"]["accuracy"] <= 1 and 0 <= report["final"]["accuracy"] <= 1
    assert [s["step"] for s in report["per_step"]] == [1, 2, 3, 4]
    assert all(s["memory_mib"] > 0 and s["loss"] > 0 for s in report["per_step"])
    if method == "hift":  # 4 units (embed, 2 blocks, head), one per step
        assert [s["group"] for s in report["per_step"]] == ["embed", "layers.0", "layers.1", "head"]
        assert report["hift_groups"] == 4 and report["hift_cycles"] == 1
    for name in ("report.md", "loss.png", "memory.png", "hiftune_run.json", "tokenizer.json"):
        assert (out_dir / name).is_file(), name
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert not torch.equal(saved.model.norm.weight, base.model.norm.weight)  # it trained


def test_prompt_cls_learns(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_llama: Path, cls_jsonl: Path
) -> None:
    code, _, _ = run_cli(
        capsys, "--model", tiny_llama, "--data", cls_jsonl, *CLS, "--batch-size", "8",
        "--epochs", "8", "--lr", "2e-2", "--eval-split", "validation", "--units-per-group", "1",
        "--output-dir", tmp_path,
    )  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    losses = [s["loss"] for s in report["per_step"]]
    assert sum(losses[-4:]) < sum(losses[:4])
    assert report["final"]["accuracy"] == 1.0


def test_seq_cls_with_an_encoder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_bert: Path, cls_jsonl: Path
) -> None:
    code, out, _ = run_cli(
        capsys, "--model", tiny_bert, "--task", "seq-cls", "--data", cls_jsonl, *CLS, *FAST,
        "--output-dir", tmp_path,
    )  # fmt: skip
    assert code == 0, out
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert model.config.num_labels == 2


def test_a_saved_classifier_names_its_classes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_bert: Path, cls_jsonl: Path
) -> None:
    code, out, _ = run_cli(
        capsys, "--model", tiny_bert, "--task", "seq-cls", "--data", cls_jsonl, *CLS, *FAST,
        "--no-zero-shot", "--output-dir", tmp_path,
    )  # fmt: skip
    assert code == 0, out
    from transformers import AutoConfig, pipeline

    # The data's labels, in label order (sorted), not LABEL_0 / LABEL_1.
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.id2label == {0: "negative", 1: "positive"}
    assert config.label2id == {"negative": 0, "positive": 1}
    answers = pipeline("text-classification", model=str(tmp_path), device="cpu")(
        ["a great movie", "a terrible movie"]
    )
    assert {a["label"] for a in answers} <= {"negative", "positive"}


def test_also_eval_reports_the_other_split(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_bert: Path, cls_jsonl: Path
) -> None:
    code, out, _ = run_cli(
        capsys, "--model", tiny_bert, "--task", "seq-cls", "--data", cls_jsonl, *CLS, *FAST,
        "--also-eval", "validation", "--no-zero-shot", "--output-dir", tmp_path,
    )  # fmt: skip
    assert code == 0
    assert "fine-tuned on validation: accuracy" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["zero_shot"] is None and "accuracy" in report["also_eval"]["validation"]


def test_sft_with_chat_template(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_llama: Path, sft_jsonl: Path
) -> None:
    code, out, _ = run_cli(
        capsys, "--model", tiny_llama, "--task", "sft", "--data", sft_jsonl,
        "--prompt-field", "question", "--response-field", "answer", *FAST, "--output-dir", tmp_path,
    )  # fmt: skip
    assert code == 0
    assert "fine-tuned: loss" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["final"]["loss"] > 0
    # Up to three held-out prompts (there are 2 here), answered before and after training and
    # scored; each shows the user's question, not the template around it.
    samples = report["samples"]
    assert len(samples) == min(3, report["eval_examples"]) > 0
    assert all(s["prompt"].startswith("review :") for s in samples)
    assert report["final"]["generation_prompts"] == report["zero_shot"]["generation_prompts"] > 0
    assert all(isinstance(s["base"], str) and isinstance(s["fine_tuned"], str) for s in samples)
    assert all(s["reference"] in ("positive", "negative") for s in samples)
    assert "Held-out prompts" in (tmp_path / "report.md").read_text()
    assert "held-out prompt 1: review :" in out


def test_training_arguments_options_reach_the_trainer(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_llama: Path, sft_jsonl: Path
) -> None:
    code, _, err = run_cli(
        capsys, "--model", tiny_llama, "--task", "sft", "--data", sft_jsonl,
        "--prompt-field", "question", "--response-field", "answer", *FAST, "--no-zero-shot",
        "--gradient-checkpointing", "--report-to", "tensorboard", "--learning-rate", "0.01",
        "--output-dir", tmp_path,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["lr"] == 0.01
    assert report["config"]["training_args"] == {
        "gradient_checkpointing": True,
        "report_to": "tensorboard",
    }
    assert all(math.isfinite(s["loss"]) for s in report["per_step"])
    assert list(tmp_path.rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("optimizer", ["sgd", "sgdm", "adagrad", "adafactor"])
def test_every_optimizer_runs(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tiny_llama: Path,
    cls_jsonl: Path,
    optimizer: str,
) -> None:
    code, _, err = run_cli(
        capsys, "--model", tiny_llama, "--data", cls_jsonl, *CLS, *FAST, "--no-zero-shot",
        "--optimizer", optimizer, "--output-dir", tmp_path,
    )  # fmt: skip
    assert code == 0, err


@pytest.mark.parametrize(
    ("method", "precision"), [("hift", "bf16"), ("hift", "fp16"), ("fpft", "bf16")]
)
def test_mixed_precision_runs(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tiny_llama: Path,
    cls_jsonl: Path,
    method: str,
    precision: str,
) -> None:
    code, _, err = run_cli(
        capsys, "--model", tiny_llama, "--data", cls_jsonl, *CLS, *FAST, "--no-zero-shot",
        "--method", method, "--precision", precision, "--output-dir", tmp_path,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "report.json").read_text())["steps"] == 4


def test_optimizer_mapping() -> None:
    from transformers.optimization import Adafactor

    cfg = TrainRecipeConfig(optimizer="sgdm", lr=0.1)
    cls, kw = resolve_optimizer(cfg.optimizer, lr=cfg.lr)  # what the recipe hands the Trainer
    assert cls is torch.optim.SGD and kw == {"lr": 0.1, "momentum": 0.9}
    cfg = TrainRecipeConfig(optimizer="adafactor", lr=0.1)
    cls, kw = resolve_optimizer(cfg.optimizer, lr=cfg.lr)
    assert cls is Adafactor and not kw["relative_step"] and not kw["scale_parameter"]


def test_config_file_and_flag_precedence(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_llama: Path, cls_jsonl: Path
) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model: {tiny_llama}\ndata: {cls_jsonl}\ntext-field: sentence\nlabel_field: sentiment\n"
        f"batch_size: 4\nmax_steps: 3\nlr: 0.5\nunits_per_group: 2\noutput_dir: {tmp_path / 'o'}\n"
    )
    code, _, err = run_cli(capsys, "--config", cfg, "--lr", "0.01", "--no-zero-shot")
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["config"]["lr"] == 0.01 and report["config"]["batch_size"] == 4
    assert report["hift_groups"] == 2 and report["steps"] == 3


# --- from Python, without the command line ----------------------------------------------------


def test_recipe_runs_from_python(tmp_path: Path, tiny_llama: Path, cls_jsonl: Path) -> None:
    import transformers

    from hiftune.errors import UserError
    from hiftune.memory.measure import peak_memory_mib
    from hiftune.recipes.train import Recipe

    # A peak before the run must count in its peak memory, although the per-step meter resets
    # the high-water mark that the peak is read from.
    ballast = bytearray(256 * 2**20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touched, so resident
    before = peak_memory_mib()
    del ballast
    verbosity = transformers.logging.get_verbosity()
    cfg = TrainRecipeConfig(
        model=str(tiny_llama), data=str(cls_jsonl), text_field="sentence",
        label_field="sentiment", batch_size=4, max_steps=4, eval_batch_size=8,
        units_per_group=1, zero_shot=False, output_dir=str(tmp_path),
    )  # fmt: skip
    result = Recipe(cfg).run()
    assert not result.interrupted and result.checkpoint is None
    assert result.output_dir == tmp_path and result.steps == 4
    assert result.report is not None and result.report["steps"] == 4
    assert result.report["final"] == json.loads((tmp_path / "report.json").read_text())["final"]
    assert result.report["peak_memory_mib"] >= before - 0.1
    assert transformers.logging.get_verbosity() == verbosity  # quiet during the run only
    with pytest.raises(UserError, match="neither a preset"):
        Recipe(TrainRecipeConfig(model=str(tmp_path / "absent"))).run()


# --- bad input: one line, exit 2 ---------------------------------------------------------------


def test_error_missing_data_file(capsys, tmp_path: Path, tiny_llama: Path) -> None:
    code, _, err = run_cli(capsys, "--model", tiny_llama, "--data", tmp_path / "nope.jsonl")
    assert_one_line_error(code, err, "does not exist")


def test_error_field_not_in_data(capsys, tmp_path: Path, tiny_llama: Path, cls_jsonl: Path) -> None:
    code, _, err = run_cli(
        capsys, "--model", tiny_llama, "--data", cls_jsonl, "--output-dir", tmp_path
    )
    assert_one_line_error(code, err, "field 'text' (--text-field) is not in")


def test_error_empty_dataset(capsys, tmp_path: Path, tiny_llama: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = run_cli(capsys, "--model", tiny_llama, "--data", empty)
    assert_one_line_error(code, err, "holds no examples")


def test_error_model_without_weights(capsys, tmp_path: Path, tiny_llama: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(tiny_llama / "config.json", d)
    code, _, err = run_cli(capsys, "--model", d)
    assert_one_line_error(code, err, "has no weights")


def test_error_unknown_model(capsys) -> None:
    code, _, err = run_cli(capsys, "--model", "no-such-model")
    assert_one_line_error(code, err, "neither a preset")


def test_error_task_the_model_cannot_do(capsys, tiny_bert: Path, cls_jsonl: Path) -> None:
    code, _, err = run_cli(capsys, "--model", tiny_bert, "--data", cls_jsonl, *CLS)
    assert_one_line_error(code, err, "cannot do --task prompt-cls")
    code, _, err = run_cli(capsys, "--model", "minilm-l6", "--task", "sft")
    assert_one_line_error(code, err, "cannot do --task sft")


def test_error_bad_config_values(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "--batch-size", "0")
    assert_one_line_error(code, err, "batch_size must be an integer >= 1")
    bad = tmp_path / "c.yaml"
    bad.write_text("lr: 1e-4\nlearning_rte: 3\n")
    code, _, err = run_cli(capsys, "--config", bad)
    assert_one_line_error(code, err, "unknown option 'learning_rte'")
    bad.write_text("lr: 1e-4\nlearning_rate: 3\n")  # hiftune's name and TrainingArguments'
    code, _, err = run_cli(capsys, "--config", bad)
    assert_one_line_error(code, err, "lr='1e-4' and learning_rate=3 in")
    code, _, err = run_cli(capsys, "--optim", "adamw_torch")
    assert_one_line_error(code, err, "optim cannot be set: hiftune builds the optimizer itself")
    code, _, err = run_cli(capsys, "--config", tmp_path / "absent.yaml")
    assert_one_line_error(code, err, "does not exist")


def test_error_label_words_do_not_fit(
    capsys, tmp_path: Path, tiny_llama: Path, cls_jsonl: Path
) -> None:
    code, _, err = run_cli(
        capsys, "--model", tiny_llama, "--data", cls_jsonl, *CLS, "--label-words", "bad,dull,good",
        "--output-dir", tmp_path,
    )  # fmt: skip
    assert_one_line_error(code, err, "3 label words")


def test_error_resume_without_checkpoint(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "--resume", tmp_path)
    assert_one_line_error(code, err, "holds no checkpoint")
    code, _, err = run_cli(capsys, "--resume", tmp_path / "absent")
    assert_one_line_error(code, err, "is not a directory")


# --- the schedule options (issue 19) ------------------------------------------------------------


@pytest.mark.parametrize("always", ["auto", "none"])
def test_always_active_trains_a_new_head_at_every_step(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_bert: Path, cls_jsonl: Path,
    always: str,
) -> None:  # fmt: skip
    # Two steps train the two embedding units only: the new classifier moves only if it is
    # trained beside them.
    code, out, err = run_cli(
        capsys, "--model", tiny_bert, "--task", "seq-cls", "--data", cls_jsonl, *CLS, *FAST,
        "--max-steps", "2", "--lr", "1e-2", "--always-active", always,
        "--always-active-lr-scale", "3", "--no-zero-shot", "--output-dir", tmp_path,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["group"] for s in report["per_step"]] == report["plan"]["groups"][:2]
    import transformers

    from hiftune.recipes.models import load_model_and_tokenizer

    transformers.set_seed(0)  # the recipe's seed: the same fresh head
    base, _ = load_model_and_tokenizer(tiny_bert, "seq-cls")
    tuned = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    moved = not torch.equal(base.classifier.weight, tuned.classifier.weight)
    if always == "auto":
        assert "  always active: classifier.weight, classifier.bias (lr x3)" in out
        assert report["plan"]["always_active"] == ["classifier.weight", "classifier.bias"]
        assert moved and "classifier" not in report["plan"]["groups"][-1]
    else:
        assert "always active" not in out and report["plan"]["always_active"] == []
        assert not moved


def test_budget_guard_warns_of_groups_never_trained(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    tiny_llama: Path,
    cls_jsonl: Path,
) -> None:
    code, out, err = run_cli(
        capsys, "--model", tiny_llama, "--data", cls_jsonl, *CLS, *FAST, "--max-steps", "2",
        "--no-zero-shot", "--output-dir", tmp_path,
    )  # fmt: skip
    assert code == 0, err
    warning = (
        "2 optimizer steps over 4 groups of m=1: layers.1, head are never trained, fewer than "
        "the 8 updates each group should get; --max-steps 32 gives every group 8"
    )
    assert "  updates: 2 steps = 0 cycles of 4 groups and 2 steps: 1 update for embed, " in out
    assert f"  warning: {warning}" in out
    assert any(r.levelname == "WARNING" and r.getMessage() == warning for r in caplog.records)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["plan"]["warnings"] == [warning] and report["plan"]["updates"] == [1, 1, 0, 0]
    assert f"- warning: {warning}" in (tmp_path / "report.md").read_text()
    # An epoch-based run is counted the way the Trainer counts it: 36 examples, batch 4.
    code, out, err = run_cli(
        capsys, "--model", tiny_llama, "--data", cls_jsonl, *CLS, *FAST[:2], "--units-per-group",
        "1", "--epochs", "2", "--no-zero-shot", "--output-dir", tmp_path, "--overwrite-output-dir",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["plan"]["total_steps"] == report["steps"] == 18
    assert "--epochs 3.56 (32 steps) gives every group 8" in report["plan"]["warnings"][0]


def test_units_per_group_auto_and_steps_per_group(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tiny_llama: Path,
    tiny_llama8: Path,
    cls_jsonl: Path,
) -> None:
    common = ["--data", cls_jsonl, *CLS, "--batch-size", "4", "--no-zero-shot"]
    code, out, err = run_cli(
        capsys, "--model", tiny_llama8, *common, "--max-steps", "16", "--output-dir", tmp_path
    )  # the default is auto
    assert code == 0, err
    # 10 units in 16 steps: 2 groups (m=5) get 8 updates each, 3 groups (m=4) only 5-6.
    assert (
        "  units per group: m=5, auto: the smallest m from 4 up whose groups each get at least 8 "
        "updates in 16 steps"
    ) in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["plan"]["units_per_group"] == 5 and report["hift_groups"] == 2
    assert report["plan"]["warnings"] == []

    # K = 2 steps per group; the learning rate falls once per cycle of k * K = 8 steps.
    args = ["--model", tiny_llama, *common]
    code, out, err = run_cli(
        capsys, *args, "--max-steps", "16", "--units-per-group", "1", "--steps-per-group", "2",
        "--output-dir", tmp_path, "--overwrite-output-dir",
    )  # fmt: skip
    assert code == 0, err
    assert "groups: 4 of m=1 units, bottom2up, 2 steps each in turn" in out
    report = json.loads((tmp_path / "report.json").read_text())
    groups = ["embed", "embed", "layers.0", "layers.0", "layers.1", "layers.1", "head", "head"]
    assert [s["group"] for s in report["per_step"]] == groups * 2
    assert report["hift_cycles"] == 2
    lrs = [s["lr"] for s in report["per_step"]]
    assert lrs[:8] == [1e-4] * 8 and lrs[8:] == [pytest.approx(5e-5)] * 8  # linear, 2 cycles


def test_a_resumed_auto_run_keeps_its_split(
    capsys, monkeypatch, tmp_path: Path, tiny_llama8: Path, cls_jsonl: Path
) -> None:
    with monkeypatch.context() as m:
        _interrupt_at(m, 1)
        code, _, _ = run_cli(
            capsys, "--model", tiny_llama8, "--data", cls_jsonl, *CLS, "--batch-size", "4",
            "--max-steps", "8", "--units-per-group", "auto", "--no-zero-shot",
            "--output-dir", tmp_path,
        )  # fmt: skip
    assert code == 130
    # 32 steps would choose m=4 afresh; the checkpoint holds the m=10 split (8 steps: one group).
    code, out, err = run_cli(capsys, "--resume", tmp_path / "checkpoint-1", "--max-steps", "32")
    assert code == 0, err
    assert "units per group: m=10, auto, as chosen when the resumed run started" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 32 and report["hift_groups"] == 1


def test_a_finished_run_leaves_files_others_can_read_and_no_lock(
    capsys, tmp_path: Path, tiny_llama: Path, cls_jsonl: Path
) -> None:
    previous = os.umask(0o022)
    try:
        code, _, err = run_cli(
            capsys, "--model", tiny_llama, "--data", cls_jsonl, *CLS, *FAST, "--no-zero-shot",
            "--save-steps", "2", "--output-dir", tmp_path / "run",
        )  # fmt: skip
    finally:
        os.umask(previous)
    assert code == 0, err
    out_dir = tmp_path / "run"
    files = [p for p in out_dir.rglob("*") if p.is_file()]
    assert out_dir / "model.safetensors" in files
    assert out_dir / "checkpoint-2" / "model.safetensors" in files
    # safetensors writes 0600; every file of the run is 0644 under umask 022, like any new file.
    assert {str(p.relative_to(out_dir)): oct(p.stat().st_mode & 0o777) for p in files} == {
        str(p.relative_to(out_dir)): "0o644" for p in files
    }
    assert not (out_dir / ".hiftune.lock").exists()


# --- interrupt and resume ----------------------------------------------------------------------


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    original = Progress.on_step_end

    def on_step_end(self, args, state, control, **kwargs):  # a Ctrl-C arriving during the step
        if state.global_step == step:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(Progress, "on_step_end", on_step_end)


@pytest.mark.parametrize("method", ["hift", "fpft"])
def test_ctrl_c_leaves_a_resumable_checkpoint(
    capsys, monkeypatch, tmp_path: Path, tiny_llama: Path, cls_jsonl: Path, method: str
) -> None:
    args = [
        "--model", tiny_llama, "--data", cls_jsonl, *CLS, "--batch-size", "4", "--max-steps", "6",
        "--lr", "1e-2", "--no-zero-shot", "--method", method, "--seed", "3", "--units-per-group", "1",
    ]  # fmt: skip
    code, _, err = run_cli(capsys, *args, "--output-dir", tmp_path / "straight")
    assert code == 0, err

    with monkeypatch.context() as m:
        _interrupt_at(m, 2)
        code, out, _ = run_cli(capsys, *args, "--output-dir", tmp_path / "cut")
    assert code == 130
    ckpt = tmp_path / "cut" / "checkpoint-2"
    assert f"--resume {ckpt}" in out
    assert (ckpt / "hiftune_run.json").is_file() and (ckpt / "optimizer.pt").is_file()

    # Resuming needs nothing but the checkpoint: the run's config comes with it.
    code, _, err = run_cli(capsys, "--resume", tmp_path / "cut")
    assert code == 0, err
    report = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert report["steps"] == 6

    from safetensors.torch import load_file

    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_a_resumed_run_reports_the_whole_run(
    capsys, monkeypatch, tmp_path: Path, tiny_llama: Path, cls_jsonl: Path
) -> None:
    args = [
        "--model", tiny_llama, "--data", cls_jsonl, *CLS, "--batch-size", "4", "--max-steps", "6",
        "--lr", "1e-2", "--no-zero-shot", "--seed", "3", "--units-per-group", "1",
        "--eval-samples", "8",
    ]  # fmt: skip
    plotted: dict[str, list[int]] = {}
    original_plot = report_module.plot_lines

    def plot_lines(path, series, *, x=None, **kwargs):
        plotted[Path(path).name] = [s for xs in (x or {}).values() for s in xs]
        return original_plot(path, series, x=x, **kwargs)

    monkeypatch.setattr(report_module, "plot_lines", plot_lines)
    code, _, err = run_cli(capsys, *args, "--output-dir", tmp_path / "straight")
    assert code == 0, err
    straight = json.loads((tmp_path / "straight" / "report.json").read_text())

    cut = tmp_path / "cut"
    with monkeypatch.context() as m:  # stopped twice: each checkpoint carries what came before
        _interrupt_at(m, 2)
        assert run_cli(capsys, *args, "--output-dir", cut)[0] == 130
    with monkeypatch.context() as m:
        _interrupt_at(m, 4)
        assert run_cli(capsys, "--resume", cut)[0] == 130
    plotted.clear()
    code, _, err = run_cli(capsys, "--resume", cut)
    assert code == 0, err
    resumed = json.loads((cut / "report.json").read_text())

    def without_time(steps: list[dict]) -> list[dict]:
        return [{k: v for k, v in s.items() if k not in ("seconds", "memory_mib")} for s in steps]

    assert [s["step"] for s in resumed["per_step"]] == [1, 2, 3, 4, 5, 6]
    # Step, group, loss and learning rate of every step: those of the uninterrupted run.
    assert without_time(resumed["per_step"]) == without_time(straight["per_step"])
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-9)
    assert plotted == {"loss.png": [1, 2, 3, 4, 5, 6], "memory.png": [1, 2, 3, 4, 5, 6]}
    # Times count from the run's start, across the resumes, and add up to the training time.
    seconds = [s["seconds"] for s in resumed["per_step"]]
    assert seconds == sorted(seconds) and seconds[-1] <= resumed["train_seconds"] + 0.05
    assert resumed["train_seconds"] <= resumed["total_seconds"]
    assert resumed["peak_memory_mib"] >= max(s["memory_mib"] for s in resumed["per_step"])


def test_resume_from_a_different_run_is_refused(
    capsys, monkeypatch, tmp_path: Path, tiny_llama: Path, cls_jsonl: Path
) -> None:
    with monkeypatch.context() as m:
        _interrupt_at(m, 1)
        code, _, _ = run_cli(
            capsys, "--model", tiny_llama, "--data", cls_jsonl, *CLS, *FAST, "--no-zero-shot",
            "--output-dir", tmp_path,
        )  # fmt: skip
    assert code == 130
    ckpt = tmp_path / "checkpoint-1"
    code, _, err = run_cli(capsys, "--resume", ckpt, "--lr", "0.5")
    assert_one_line_error(code, err, "is from a different run: it has lr=")
    code, _, err = run_cli(capsys, "--resume", ckpt, "--model", "minilm-l6", "--task", "seq-cls")
    assert_one_line_error(code, err, "is from a different run")
    other = tmp_path / "other-model"
    shutil.copytree(tiny_llama, other)
    code, _, err = run_cli(capsys, "--resume", ckpt, "--model", other)
    assert_one_line_error(code, err, "it has model=")
    # More steps is a legitimate change: the run continues.
    code, _, err = run_cli(capsys, "--resume", ckpt, "--max-steps", "5")
    assert code == 0, err


def test_a_resumed_generation_run_keeps_its_base_answers(
    capsys, monkeypatch, tmp_path: Path, tiny_llama: Path, sft_jsonl: Path
) -> None:
    args = [
        "--model", tiny_llama, "--task", "sft", "--data", sft_jsonl, "--prompt-field", "question",
        "--response-field", "answer", "--batch-size", "4", "--max-steps", "4", "--lr", "1e-2",
        "--no-zero-shot", "--units-per-group", "1",
    ]  # fmt: skip
    code, _, err = run_cli(capsys, *args, "--output-dir", tmp_path / "straight")
    assert code == 0, err
    with monkeypatch.context() as m:
        _interrupt_at(m, 2)
        code, _, _ = run_cli(capsys, *args, "--output-dir", tmp_path / "cut")
    assert code == 130
    code, _, err = run_cli(capsys, "--resume", tmp_path / "cut")
    assert code == 0, err
    straight = json.loads((tmp_path / "straight" / "report.json").read_text())["samples"]
    resumed = json.loads((tmp_path / "cut" / "report.json").read_text())["samples"]
    # The base answers come with the checkpoint's run file, and the resumed run ends with the
    # straight run's weights: the same report as without the interruption.
    assert resumed == straight and all(s["base"] is not None for s in resumed)
