import pytest
import torch
import transformers as T
from transformers import TrainerCallback

from hiftune import HiFTConfig, HiFTOptimizer
from hiftune.integrations.transformers import (
    HiFTCallback,
    HiFTTrainer,
    scale_gradients,
    unwrap_hift,
)
from tinymodels import tiny_hf_config, word_tokenizer


def _data(n=48):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(2, 64, (8,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


class Recorder(TrainerCallback):
    """Records, per optimizer step, the group that was trained and the learning rate used."""

    def __init__(self):
        self.groups, self.lrs = [], []
        self._pending = None

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        hift = unwrap_hift(optimizer)
        self._pending = (hift.active_group, hift.param_groups[hift.active_group]["lr"])

    def on_step_end(self, args, state, control, **kwargs):
        self.groups.append(self._pending[0])
        self.lrs.append(self._pending[1])


def _model_and_args(out, max_steps, *, accum=2, seed=0):
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_hf_config("llama"))
    args = T.TrainingArguments(
        str(out),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accum,
        max_steps=max_steps,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        weight_decay=0.1,
        max_grad_norm=1.0,
        save_steps=4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
    )
    return model, args


def _trainer(out, max_steps, *, accum=2, callbacks=(), seed=0, **hift):
    model, args = _model_and_args(out, max_steps, accum=accum, seed=seed)
    return HiFTTrainer(
        model=model,
        args=args,
        train_dataset=_data(),
        hift_config=HiFTConfig(**hift),
        callbacks=list(callbacks),
    )


def test_trainer_steps_one_group_per_optimizer_step_with_delayed_lr(tmp_path):
    rec = Recorder()
    trainer = _trainer(tmp_path, max_steps=10, accum=2, callbacks=[rec])
    trainer.train()
    hift = unwrap_hift(trainer.optimizer)
    assert isinstance(hift, HiFTOptimizer) and hift.num_groups == 5
    # One group per optimizer step (each made of 2 micro-batches), in queue order.
    assert rec.groups == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    # 10 steps = 2 cycles; linear decay counted in cycles, constant within a cycle.
    assert rec.lrs == [1e-2] * 5 + [5e-3] * 5
    assert hift.cycle == 2
    decays = {g["weight_decay"] for g in hift.param_groups}
    assert decays == {0.0, 0.1}  # the Trainer's no-decay split for biases and norms


def test_resume_from_checkpoint_is_exact(tmp_path):
    full = _trainer(tmp_path / "full", max_steps=7, order="random", seed=0)
    full.train()
    resumed = _trainer(tmp_path / "part", max_steps=7, order="random", seed=0)
    resumed.train()  # writes checkpoint-4 (mid-cycle: k = 5)
    again = _trainer(tmp_path / "part", max_steps=7, order="random", seed=0)
    again.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-4"))
    hift = unwrap_hift(again.optimizer)
    assert hift.steps == 7 and hift.active_group == 2
    for (n, a), (_, b) in zip(
        full.model.named_parameters(), again.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), n


def test_optimizer_cls_and_kwargs_is_wrapped(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.optimizer_cls_and_kwargs = (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})
    trainer.train()
    hift = unwrap_hift(trainer.optimizer)
    assert type(hift._inner[0]) is torch.optim.SGD
    assert hift.param_groups[0]["momentum"] == 0.9


def test_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    from hiftune.integrations.transformers import HiFTSFTTrainer

    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(tiny_hf_config("llama"))
    from datasets import Dataset

    texts = [" ".join(f"w{(i * j) % 61}" for j in range(6)) for i in range(16)]
    args = trl.SFTConfig(
        str(tmp_path),
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = HiFTSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"text": t} for t in texts]),
        processing_class=tokenizer,
        hift_config=HiFTConfig(),
    )
    trainer.train()
    hift = unwrap_hift(trainer.optimizer)
    assert hift.cycle == 1 and hift.steps == 5


def _plain_trainer(out, max_steps, *, callbacks=(), hift_seed=0, **hift):
    """A stock ``Trainer`` given a ready HiFTOptimizer and delayed scheduler via ``optimizers=``."""
    model, args = _model_and_args(out, max_steps)
    opt = HiFTOptimizer(
        model, torch.optim.AdamW, HiFTConfig(seed=hift_seed, **hift), lr=args.learning_rate
    )
    cycles = -(-max_steps // opt.num_groups)
    sched = opt.delay(torch.optim.lr_scheduler.LambdaLR(opt, lambda c: 1 - c / cycles))
    return T.Trainer(
        model=model,
        args=args,
        train_dataset=_data(),
        optimizers=(opt, sched),
        callbacks=[HiFTCallback(), *callbacks],
    )


class LogRecorder(TrainerCallback):
    """Keeps the logs as the callbacks after HiFTCallback (printer, loggers) see them."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_plain_trainer_with_optimizers_argument(tmp_path):
    rec, log = Recorder(), LogRecorder()
    trainer = _plain_trainer(tmp_path, max_steps=10, callbacks=[rec, log])
    trainer.train()
    assert rec.groups == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert rec.lrs == [1e-2] * 5 + [5e-3] * 5  # the user's schedule, stepped once per cycle
    steps = [h for h in log.logs if "loss" in h]
    assert [h["hift_group"] for h in steps] == rec.groups  # the group each logged step trained
    assert steps[-1]["hift_cycle"] == 2


def test_plain_trainer_with_optimizers_argument_resumes_exactly(tmp_path):
    full = _plain_trainer(tmp_path / "full", max_steps=7, order="random")
    full.train()
    _plain_trainer(tmp_path / "part", max_steps=7, order="random").train()
    # Another HiFT seed: the shuffled order must come back from the checkpoint, not the config.
    again = _plain_trainer(tmp_path / "part", max_steps=7, order="random", hift_seed=5)
    again.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-4"))
    assert unwrap_hift(again.optimizer).steps == 7
    for (n, a), (_, b) in zip(
        full.model.named_parameters(), again.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), n


# --- fp16 loss scaling through the Trainer ---------------------------------------------------


def _head_update(tmp_path, precision, max_grad_norm):
    """How far one SGD step of the head group moves the LM head, and the logged loss."""
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(tiny_hf_config("llama"))
    before = model.lm_head.weight.detach().float().clone()
    args = T.TrainingArguments(
        str(tmp_path / precision),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=0.5,
        lr_scheduler_type="constant",
        optim="sgd",
        max_grad_norm=max_grad_norm,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = HiFTTrainer(
        model=model,
        args=args,
        train_dataset=_data(8),
        hift_config=HiFTConfig(order="top2down", precision=precision, offload="none"),
    )
    trainer.train()
    hift = unwrap_hift(trainer.optimizer)
    assert hift is not None and hift.skipped_steps == 0
    hift.close()
    delta = (model.lm_head.weight.detach().float() - before).norm().item()
    loss = next(r["loss"] for r in trainer.state.log_history if "loss" in r)
    return delta, loss


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_fp16_trains_like_fp32_through_the_trainer(tmp_path, max_grad_norm):
    # Without loss scaling in the Trainer's backward, step() divided unscaled gradients by
    # 65536 and the head moved ~1e-5 of what it should (and clipping the scaled gradients
    # to max_grad_norm shrank it as much again).
    ref, ref_loss = _head_update(tmp_path, "fp32", max_grad_norm)
    got, loss = _head_update(tmp_path, "fp16", max_grad_norm)
    assert ref > 1e-3
    assert got == pytest.approx(ref, rel=0.05)
    assert loss == pytest.approx(ref_loss, rel=0.01)  # the logged loss is not the scaled one


def test_the_trainers_fp16_option_is_refused(tmp_path):
    # The Trainer's GradScaler and HiFT's clipping hook do not mix: the gradients stayed scaled
    # and every update shrank by the loss scale. Set after construction: TrainingArguments may
    # refuse fp16 on a machine without CUDA (this one's CPU mixed precision has no scaler).
    model, args = _model_and_args(tmp_path, max_steps=1)
    args.fp16 = True
    with pytest.raises(ValueError, match=r"fp16=True.*HiFTConfig\(precision='fp16'\)"):
        HiFTTrainer(model=model, args=args, train_dataset=_data())


def test_scale_gradients_keeps_the_value_and_scales_the_gradient():
    x = torch.tensor(3.0, requires_grad=True)
    y = scale_gradients(x * 2, 1024.0)
    assert y.item() == 6.0
    y.backward()
    assert x.grad.item() == 2048.0


@pytest.mark.parametrize("option", ["is_fsdp_enabled", "is_deepspeed_enabled"])
def test_the_trainers_fsdp_and_deepspeed_options_are_refused(tmp_path, monkeypatch, option):
    # accelerate turns both off on a CPU, so the check is driven by what the Trainer decided.
    original = T.Trainer.create_accelerator_and_postprocess

    def decided(self):
        original(self)
        setattr(self, option, True)

    monkeypatch.setattr(T.Trainer, "create_accelerator_and_postprocess", decided)
    with pytest.raises(ValueError, match="shard_by_units"):
        _trainer(tmp_path, max_steps=1)
