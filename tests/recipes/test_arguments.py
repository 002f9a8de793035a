"""Every TrainingArguments option in the recipe: aliases, pass-through, refusals, checkpointing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hiftune.cli import parse_args
from hiftune.cli.train import config_from_args
from hiftune.engine.optimizers import resolve_optimizer
from hiftune.errors import UserError
from hiftune.recipes.arguments import (
    ALIASES,
    CONTROLLED,
    optimizer_kwargs,
    training_argument_fields,
    training_arguments,
)
from hiftune.recipes.config import RUN_CONFIG, TrainRecipeConfig, build_config


def parse(*argv: str) -> TrainRecipeConfig:
    return config_from_args(parse_args(["train", *argv]))


def test_aliases_are_training_arguments_fields() -> None:
    fields = training_argument_fields()
    assert set(ALIASES.values()) <= set(fields)
    assert set(CONTROLLED) <= set(fields)


def test_hiftune_names_and_training_arguments_names_are_one_option(tmp_path: Path) -> None:
    cfg = parse("--learning-rate", "0.01", "--num_train_epochs", "2", "--grad-accum", "3")
    assert (cfg.lr, cfg.epochs, cfg.grad_accum, cfg.training_args) == (0.01, 2.0, 3, {})
    assert parse("--lr", "0.01", "--learning-rate", "0.01").lr == 0.01  # the same value: fine
    with pytest.raises(UserError, match="same option with different values"):
        parse("--lr", "0.01", "--learning-rate", "0.02")
    with pytest.raises(UserError, match="same option with different values"):
        build_config({"batch_size": 4, "per_device_train_batch_size": 8})
    # A config file takes the TrainingArguments names too, dashes or underscores.
    path = tmp_path / "run.yaml"
    path.write_text("learning-rate: 1e-3\ngradient_checkpointing: true\neval_steps: '5'\n")
    cfg = build_config({"config": str(path)})
    assert cfg.lr == 1e-3
    assert cfg.training_args == {"gradient_checkpointing": True, "eval_steps": 5.0}
    # Explicit values win over the file, option by option.
    cfg = build_config({"config": str(path), "eval_strategy": "steps", "lr": 0.5})
    assert cfg.lr == 0.5 and cfg.training_args["eval_strategy"] == "steps"
    assert cfg.training_args["gradient_checkpointing"] is True


def test_every_other_option_passes_through(tmp_path: Path) -> None:
    cfg = parse(
        "--gradient-checkpointing", "--report-to", "tensorboard", "--eval-strategy", "steps",
        "--eval-steps", "2", "--no-dataloader-pin-memory", "--save-total-limit", "1",
    )  # fmt: skip
    assert cfg.training_args == {
        "gradient_checkpointing": True,
        "report_to": "tensorboard",
        "eval_strategy": "steps",
        "eval_steps": 2.0,
        "dataloader_pin_memory": False,
        "save_total_limit": 1,
    }
    args = training_arguments(cfg, tmp_path)
    assert args.gradient_checkpointing and args.report_to == ["tensorboard"]
    assert args.eval_strategy == "steps" and args.eval_steps == 2 and args.save_total_limit == 1
    # hiftune's own defaults stay where the user said nothing.
    default = training_arguments(TrainRecipeConfig(), tmp_path)
    assert (default.logging_steps, default.report_to, default.learning_rate) == (1, [], 1e-4)
    assert (default.per_device_train_batch_size, default.eval_strategy) == (8, "no")
    assert not default.gradient_checkpointing and default.disable_tqdm


def test_options_the_recipe_controls_are_refused_with_a_reason() -> None:
    with pytest.raises(UserError, match="optim cannot be set: hiftune builds the optimizer"):
        parse("--optim", "sgd")
    with pytest.raises(UserError, match="use --resume"):
        build_config({"resume_from_checkpoint": "x"})
    with pytest.raises(UserError, match="--precision fp16"):
        parse("--fp16")
    assert parse("--fp16", "false").training_args == {"fp16": False}  # no conflict
    with pytest.raises(UserError, match="adam_beta1 is an option of --optimizer adamw, not sgd"):
        parse("--adam-beta1", "0.8", "--optimizer", "sgd")
    with pytest.raises(UserError, match="unknown option 'no_such_option'"):
        build_config({"no_such_option": 1})
    with pytest.raises(UserError, match="learning_rate is hiftune's own option lr"):
        TrainRecipeConfig(training_args={"learning_rate": 0.1})
    with pytest.raises(UserError, match="seed is hiftune's own option seed"):
        build_config({"training_args": {"seed": 3}})  # not a way around hiftune's field
    with pytest.raises(UserError, match="warmup_ratio or warmup_steps"):
        parse("--warmup-ratio", "0.1", "--warmup-steps", "3")


def test_invalid_combinations_are_one_line_user_errors(tmp_path: Path) -> None:
    cfg = build_config({"load_best_model_at_end": True, "eval_strategy": "steps"})
    with pytest.raises(UserError, match="invalid training arguments"):
        training_arguments(cfg, tmp_path)  # save and eval strategies must match for it


def test_adam_options_reach_the_optimizer() -> None:
    cfg = parse("--adam-beta1", "0.8", "--adam-epsilon", "1e-6", "--lr", "0.01")
    cls, kwargs = resolve_optimizer(cfg.optimizer, **optimizer_kwargs(cfg))
    assert cls is torch.optim.AdamW
    assert kwargs == {"lr": 0.01, "betas": (0.8, 0.999), "eps": 1e-6}


def _lm_data(n: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {"input_ids": ids, "labels": ids}
        for ids in (torch.randint(4, 30, (12,), generator=g) for _ in range(n))
    ]


def _train(
    model_dir: Path, out_dir: Path, **options: object
) -> tuple[torch.nn.Module, list[float], list[float]]:
    """Trains HiFT (m=1) on random tokens; returns the model, the losses and the learning rates."""
    from transformers import AutoModelForCausalLM

    from hiftune import HiFTConfig
    from hiftune.integrations.transformers import HiFTTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = build_config({"max_steps": 4, "batch_size": 2, "lr": 1e-2, **options})
    data = _lm_data(4 * cfg.max_steps if cfg.max_steps else 8)
    trainer = HiFTTrainer(
        model=model,
        args=training_arguments(cfg, out_dir),
        train_dataset=data,
        hift_config=HiFTConfig(units_per_group=1),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return model, [h["loss"] for h in logs], [h["learning_rate"] for h in logs]


def test_gradient_checkpointing_with_backward_truncation(tmp_path: Path, tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = dict(AutoModelForCausalLM.from_pretrained(tiny_llama).named_parameters())
    plain, plain_losses, _ = _train(tiny_llama, tmp_path / "plain")
    ckpt, ckpt_losses, _ = _train(
        tiny_llama, tmp_path / "ckpt", gradient_checkpointing=True, report_to="tensorboard"
    )
    # (transformers 5 renamed gradient checkpointing to activation checkpointing)
    flag = "is_activation_checkpointing"
    assert getattr(ckpt, flag if hasattr(ckpt, flag) else "is_gradient_checkpointing")
    assert len(ckpt_losses) == 4 and all(torch.isfinite(torch.tensor(ckpt_losses)))
    # Recomputing activations changes nothing: every group (embed, 2 blocks, head: one cycle)
    # trains exactly as without checkpointing, and each of them changed.
    assert ckpt_losses == pytest.approx(plain_losses, rel=1e-5)
    for name, p in ckpt.named_parameters():
        torch.testing.assert_close(p, dict(plain.named_parameters())[name], msg=name)
    for prefix in ("model.embed_tokens", "model.layers.0.", "model.layers.1.", "model.norm"):
        assert any(
            not torch.equal(p, base[n]) for n, p in ckpt.named_parameters() if n.startswith(prefix)
        ), prefix
    events = list((tmp_path / "ckpt").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_resume_compares_pass_through_options(tmp_path: Path) -> None:
    from hiftune.recipes.train import Recipe

    saved = build_config({"report_to": "tensorboard", "label_smoothing_factor": 0.1})
    (tmp_path / RUN_CONFIG).write_text(json.dumps({"config": saved.to_dict(), "identity": {}}))
    # What is trained must stay: a pass-through option that changes it is refused...
    changed = build_config({"report_to": "tensorboard"})
    with pytest.raises(UserError, match=r"it has label_smoothing_factor=0\.1, this run has"):
        Recipe(changed)._check_resume(tmp_path, {})
    # ...one that does not (where the logs go, checkpointing) may differ.
    same = build_config({"label_smoothing_factor": 0.1, "gradient_checkpointing": True})
    assert Recipe(same)._check_resume(tmp_path, {})["config"]["training_args"]


def test_scheduler_options_pass_through(tmp_path: Path, tiny_llama: Path) -> None:
    # --lr-scheduler-type is hiftune's --scheduler; its own options come as JSON text.
    cfg = parse(
        "--lr-scheduler-type", "cosine_with_min_lr", "--lr-scheduler-kwargs", '{"min_lr": 1e-3}'
    )
    assert cfg.scheduler == "cosine_with_min_lr"
    _, _, lrs = _train(tiny_llama, tmp_path, **cfg.training_args, scheduler=cfg.scheduler)
    # 4 steps = 1 cycle of 4 groups: HiFT's schedule counts cycles, all four steps share one LR.
    assert lrs == [pytest.approx(1e-2)] * 4
    _, _, lrs = _train(
        tiny_llama, tmp_path / "long", **cfg.training_args, scheduler=cfg.scheduler, max_steps=12
    )
    # 3 cycles: cosine from 1e-2 down towards min_lr, one value per cycle.
    assert lrs[0] == lrs[3] == pytest.approx(1e-2) and lrs[4] == lrs[7] > lrs[8] > 1e-3


def test_gradient_checkpointing_is_one_name_without_a_deprecation_warning(tmp_path: Path) -> None:
    import warnings

    cfg = parse("--gradient-checkpointing")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = training_arguments(cfg, tmp_path)
    assert args.gradient_checkpointing is True
    if "activation_checkpointing" in training_argument_fields():  # transformers >= 5
        assert args.activation_checkpointing is True
        assert not [w for w in caught if "gradient_checkpointing" in str(w.message)]
    with pytest.raises(UserError, match="same option with different values"):
        training_arguments(
            build_config({"gradient_checkpointing": True, "activation_checkpointing": False}),
            tmp_path,
        )
