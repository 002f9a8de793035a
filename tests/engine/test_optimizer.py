"""HiFTOptimizer: one group per step, any optimizer, paging, orders, clipping, exact resume."""

import copy
import io
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hiftune import HiFTConfig, HiFTOptimizer, split_units
from tinymodels import TinyLM, lm_loss, snapshot, train_steps


class SignSGD(torch.optim.Optimizer):
    """An optimizer hiftune has never seen, with state of its own (a step counter tensor)."""

    def __init__(self, params, lr=0.01):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["count"] = state.get("count", torch.zeros(())) + 1
                p.add_(p.grad.sign(), alpha=-group["lr"])


OPTIMIZERS = {
    "adamw": (torch.optim.AdamW, {"lr": 1e-2}),
    "sgd": (torch.optim.SGD, {"lr": 1e-1}),
    "sgdm": (torch.optim.SGD, {"lr": 1e-1, "momentum": 0.9}),
    "adagrad": (torch.optim.Adagrad, {"lr": 1e-1}),
    # The engine does not need transformers; only this case does (skipped without it).
    "adafactor": (
        "transformers.optimization.Adafactor",
        {"lr": 1e-2, "scale_parameter": False, "relative_step": False},
    ),
    "custom": (SignSGD, {"lr": 1e-2}),
}


def _optimizer(name):
    """``(class, kwargs)`` of a case of OPTIMIZERS; a class given by path is imported or skipped."""
    cls, kwargs = OPTIMIZERS[name]
    if isinstance(cls, str):
        module, _, attr = cls.rpartition(".")
        cls = getattr(pytest.importorskip(module), attr)
    return cls, kwargs


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_one_cycle_updates_every_parameter_exactly_once(tiny_lm, batches, name):
    cls, kwargs = _optimizer(name)
    # The paper's split (whole parameters); tests/engine/test_shards.py covers row shards.
    opt = HiFTOptimizer(tiny_lm, cls, HiFTConfig(offload="none", max_unit_params=None), **kwargs)
    assert opt.group_names == ["embed", "layers.0", "layers.1", "layers.2", "layers.3", "head"]
    updated = {n: 0 for n, _ in tiny_lm.named_parameters()}
    for step, ids in enumerate(batches[: opt.num_groups]):
        assert opt.active_group == step
        active = set(opt.groups[step])
        # Only the active group is trainable, so only it gets gradients.
        assert {n for n, p in tiny_lm.named_parameters() if p.requires_grad} == active
        before = snapshot(tiny_lm)
        lm_loss(tiny_lm, ids).backward()
        assert {n for n, p in tiny_lm.named_parameters() if p.grad is not None} == active
        opt.step()
        opt.zero_grad()
        for n, p in tiny_lm.named_parameters():
            if not torch.equal(before[n], p):
                assert n in active, f"{n} changed while {opt.group_names[step]} was active"
                updated[n] += 1
    assert opt.cycle == 1 and opt.active_group == 0
    assert set(updated.values()) == {1}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("offload", ["none", "host", "disk"])
def test_single_group_equals_the_plain_optimizer(tiny_lm, batches, name, offload):
    cls, kwargs = _optimizer(name)
    plain_model = copy.deepcopy(tiny_lm)
    plain = cls(plain_model.parameters(), **kwargs)
    n_units = len(split_units(tiny_lm))
    opt = HiFTOptimizer(
        tiny_lm, cls, HiFTConfig(units_per_group=n_units, offload=offload), **kwargs
    )
    assert opt.num_groups == 1
    train_steps(plain_model, plain, batches[:6])
    train_steps(tiny_lm, opt, batches[:6])
    for (n, a), (_, b) in zip(
        plain_model.named_parameters(), tiny_lm.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=n)
    opt.close()


@pytest.mark.parametrize("name", ["adamw", "sgdm", "adagrad", "adafactor"])
def test_offloading_does_not_change_results(batches, name, tmp_path):
    cls, kwargs = _optimizer(name)
    results = []
    for offload in ["none", "host", "disk"]:
        torch.manual_seed(0)
        model = TinyLM()
        extra = {"offload_dir": str(tmp_path / "state")} if offload == "disk" else {}
        opt = HiFTOptimizer(model, cls, HiFTConfig(offload=offload, **extra), **kwargs)
        train_steps(model, opt, batches)
        results.append(snapshot(model))
        opt.close()
    for other in results[1:]:
        for n in results[0]:
            assert torch.equal(results[0][n], other[n]), n


def test_state_is_kept_per_group_across_cycles_and_paged_out(tiny_lm, batches):
    opt = HiFTOptimizer(tiny_lm, torch.optim.AdamW, HiFTConfig(offload="none"), lr=1e-2)
    train_steps(tiny_lm, opt, batches[: 2 * opt.num_groups])  # two cycles
    assert opt.cycle == 2
    # Between steps no group's state sits in the optimizers: all of it is in the store.
    assert len(opt.state) == 0
    sd = opt.state_dict()
    for group in sd["groups"]:
        steps = {float(s["step"]) for s in group["optimizer"]["state"].values()}
        assert steps == {2.0}  # each group stepped once per cycle, its count never reset


def test_disk_offload_writes_one_file_per_group_and_cleans_up(tiny_lm, batches, tmp_path):
    opt = HiFTOptimizer(
        tiny_lm,
        torch.optim.AdamW,
        HiFTConfig(offload="disk", offload_dir=str(tmp_path)),
        lr=1e-2,
    )
    train_steps(tiny_lm, opt, batches[: opt.num_groups])
    opt.store.flush()
    assert len(list(tmp_path.glob("group_*.safetensors"))) == opt.num_groups
    opt.close()
    assert list(tmp_path.glob("group_*")) == []


def test_gradient_accumulation_switches_once_per_step(tiny_lm, batches):
    opt = HiFTOptimizer(tiny_lm, torch.optim.SGD, HiFTConfig(offload="none"), lr=0.1)
    for step in range(3):
        for micro in batches[2 * step : 2 * step + 2]:
            (lm_loss(tiny_lm, micro) / 2).backward()
            assert opt.active_group == step  # micro-batches never switch the group
        opt.step()
        opt.zero_grad()
    assert opt.active_group == 3


def test_clipping_sees_only_the_active_group(tiny_lm, batches):
    opt = HiFTOptimizer(tiny_lm, torch.optim.SGD, HiFTConfig(offload="none"), lr=0.1)
    opt.step()  # move to layers.0
    lm_loss(tiny_lm, batches[0]).backward()
    active = [p for n, p in tiny_lm.named_parameters() if n in set(opt.groups[1])]
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in active]))
    total = torch.nn.utils.clip_grad_norm_(tiny_lm.parameters(), max_norm=1e9)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(opt.clip_grad_norm_(1e9), expected)


@pytest.mark.parametrize("order", ["bottom2up", "top2down", "random"])
def test_orders_and_a_fixed_random_queue(tiny_lm, batches, order):
    opt = HiFTOptimizer(tiny_lm, torch.optim.SGD, HiFTConfig(order=order, seed=7), lr=0.1)
    names = opt.group_names
    if order == "bottom2up":
        assert names[0].startswith("embed") and names[-1] == "head"
    elif order == "top2down":
        assert names[0] == "head" and names[-1].startswith("embed")
    else:
        assert sorted(names) == sorted(HiFTOptimizer(TinyLM(), torch.optim.SGD, lr=1).group_names)
    seen = []
    for ids in batches[: 2 * len(names)]:
        seen.append(opt.group_names[opt.active_group])
        lm_loss(tiny_lm, ids).backward()
        opt.step()
        opt.zero_grad()
    assert seen == names + names  # the queue repeats the same order every cycle


def test_param_groups_fn_sets_per_parameter_options(tiny_lm):
    def no_decay_for_biases(named):
        return [
            {"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": 0.1},
            {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
        ]

    opt = HiFTOptimizer(tiny_lm, torch.optim.AdamW, param_groups_fn=no_decay_for_biases, lr=1e-3)
    decays = sorted({g["weight_decay"] for g in opt.param_groups})
    assert decays == [0.0, 0.1]
    with pytest.raises(ValueError, match="exactly once"):
        HiFTOptimizer(TinyLM(), torch.optim.AdamW, param_groups_fn=lambda named: [], lr=1e-3)


def test_bad_input_errors(tiny_lm):
    n = len(split_units(tiny_lm))
    with pytest.raises(ValueError, match=f"number of units n={n}"):
        HiFTOptimizer(tiny_lm, torch.optim.SGD, HiFTConfig(units_per_group=n + 1), lr=0.1)
    with pytest.raises(TypeError, match="optimizer class"):
        HiFTOptimizer(tiny_lm, torch.optim.SGD(tiny_lm.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="no trainable parameters"):
        HiFTOptimizer(TinyLM().requires_grad_(False), torch.optim.SGD, lr=0.1)


# --- exact resume ----------------------------------------------------------------------------


def _make(seed=0, order="random", offload="host", tmp=None):
    torch.manual_seed(seed)
    model = TinyLM()
    extra = {"offload_dir": str(tmp)} if offload == "disk" else {}
    cfg = HiFTConfig(order=order, seed=11, offload=offload, **extra)
    opt = HiFTOptimizer(model, torch.optim.AdamW, cfg, lr=1e-2)
    sched = opt.delay(torch.optim.lr_scheduler.LambdaLR(opt, lambda c: 0.9**c))
    return model, opt, sched


@pytest.mark.parametrize("offload", ["host", "disk"])
def test_resume_mid_cycle_is_bit_identical(batches, tmp_path, offload):
    model, opt, sched = _make(offload=offload, tmp=tmp_path / "a")
    train_steps(model, opt, batches, sched)
    reference = snapshot(model)

    model, opt, sched = _make(offload=offload, tmp=tmp_path / "b")
    k = opt.num_groups
    train_steps(model, opt, batches[:9], sched)  # stop mid-cycle (k = 7: TinyLM's embedding unit
    # is larger than a block, so by default it is split in two)
    path = tmp_path / "ckpt.pt"
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, path
    )
    opt.close()

    model, opt, sched = _make(seed=123, order="bottom2up", offload=offload, tmp=tmp_path / "c")
    ckpt = torch.load(path, weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    assert k == 7 and opt.active_group == 9 - k and opt.cycle == 1
    assert opt.group_names == _make()[1].group_names  # the shuffled order came back too
    train_steps(model, opt, batches[9:], sched)
    for n, p in snapshot(model).items():
        assert torch.equal(p, reference[n]), n


def test_resume_in_a_new_process(tmp_path):
    script = textwrap.dedent(
        """
        import sys, torch
        from tinymodels import TinyLM, lm_loss
        from hiftune import HiFTConfig, HiFTOptimizer

        mode, path = sys.argv[1], sys.argv[2]
        torch.manual_seed(0)
        model = TinyLM()
        opt = HiFTOptimizer(model, torch.optim.Adagrad, HiFTConfig(order="random", seed=5), lr=0.1)
        sched = opt.delay(torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
        g = torch.Generator().manual_seed(1)
        data = [torch.randint(0, 32, (4, 12), generator=g) for _ in range(14)]
        start = 0
        if mode == "resume":
            ck = torch.load(path + ".ckpt", weights_only=True)
            model.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"])
            sched.load_state_dict(ck["sched"]); start = 8
        for i in range(start, 14):
            if mode == "first" and i == 8:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                            "sched": sched.state_dict()}, path + ".ckpt")
                sys.exit(0)
            lm_loss(model, data[i]).backward(); opt.step(); sched.step(); opt.zero_grad()
        torch.save(model.state_dict(), path + "." + mode)
        """
    )
    (tmp_path / "run.py").write_text(script)
    env_path = str(tmp_path / "w")
    tests_dir = Path(__file__).resolve().parents[1]  # where tinymodels.py lives
    env = {**os.environ, "PYTHONPATH": str(tests_dir)}
    for mode in ["full", "first", "resume"]:
        subprocess.run(
            [sys.executable, str(tmp_path / "run.py"), mode, env_path], check=True, env=env
        )
    full = torch.load(env_path + ".full", weights_only=True)
    resumed = torch.load(env_path + ".resume", weights_only=True)
    for n in full:
        assert torch.equal(full[n], resumed[n]), n


def test_loading_a_checkpoint_of_another_model_fails_clearly(tiny_lm):
    opt = HiFTOptimizer(tiny_lm, torch.optim.AdamW, lr=1e-2)
    other = HiFTOptimizer(TinyLM(layers=2), torch.optim.AdamW, lr=1e-2)
    with pytest.raises(ValueError, match="different model or unit split"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="not a HiFTOptimizer state dict"):
        opt.load_state_dict(torch.optim.AdamW(tiny_lm.parameters()).state_dict())


@pytest.mark.parametrize("offload", ["none", "host", "disk"])
def test_copying_or_pickling_the_optimizer_is_refused_with_what_to_do(tiny_lm, batches, offload):
    # A copy would drive no model, and a pickle lost the paged state without a word: both refuse.
    opt = HiFTOptimizer(tiny_lm, torch.optim.AdamW, HiFTConfig(offload=offload), lr=1e-2)
    train_steps(tiny_lm, opt, batches[:3])
    for attempt in (copy.copy, copy.deepcopy, pickle.dumps, lambda o: torch.save(o, io.BytesIO())):
        with pytest.raises(TypeError, match=r"cannot be copied or pickled.*state_dict\(\)"):
            attempt(opt)
    train_steps(tiny_lm, opt, batches[3:5])  # the optimizer itself goes on
    assert opt.steps == 5
