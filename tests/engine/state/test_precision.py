"""Hierarchical mixed precision: bf16/fp16 weights, fp32 masters only for the active group."""

import copy

import pytest
import torch

from hiftune import HiFTConfig, HiFTOptimizer
from hiftune.engine.state.precision import LossScaler
from tinymodels import TinyLM, lm_loss


def _train(model, opt, batches):
    losses = []
    for ids in batches:
        loss = lm_loss(model, ids)
        opt.scale_loss(loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_bf16_tracks_fp32(tiny_lm, batches):
    reference = copy.deepcopy(tiny_lm)
    fp32 = HiFTOptimizer(reference, torch.optim.AdamW, HiFTConfig(), lr=1e-2)
    bf16 = HiFTOptimizer(tiny_lm, torch.optim.AdamW, HiFTConfig(precision="bf16"), lr=1e-2)
    assert all(p.dtype == torch.bfloat16 for p in tiny_lm.parameters())
    ref_losses = _train(reference, fp32, batches)
    losses = _train(tiny_lm, bf16, batches)
    assert ref_losses[-1] < ref_losses[0]  # it does learn
    for a, b in zip(ref_losses, losses, strict=True):
        assert abs(a - b) < 0.02 * a
    # Adam normalises updates, so single tiny-gradient elements may go either way; the model as
    # a whole must stay close.
    a = torch.cat([p.detach().flatten() for p in reference.parameters()])
    b = torch.cat([p.detach().float().flatten() for p in tiny_lm.parameters()])
    assert ((a - b).norm() / a.norm()).item() < 0.02


def test_masters_exist_only_for_the_active_group(tiny_lm, batches):
    opt = HiFTOptimizer(tiny_lm, torch.optim.AdamW, HiFTConfig(precision="bf16"), lr=1e-2)
    # Two cycles: each group is checked before its first step and again after it.
    for ids in batches[: 2 * opt.num_groups]:
        # Between steps the group's fp32 masters are paged out: no fp32 weight data in memory.
        assert all(m.numel() == 0 for m in opt.master_parameters())
        lm_loss(tiny_lm, ids).backward()
        opt.unscale_()  # brings them in, with the fp32 gradients
        masters = opt.master_parameters()
        assert all(m.dtype == torch.float32 and m.numel() > 0 for m in masters)
        assert all(m.grad is not None and m.grad.dtype == torch.float32 for m in masters)
        opt.step()
        opt.zero_grad()
    # and they come back exactly, fp32, in the state dict
    sd = opt.state_dict()
    masters = [m for g in sd["groups"] for m in g["masters"]]
    assert all(m.dtype == torch.float32 and m.numel() > 0 for m in masters)
    assert all(m.numel() == 0 for m in opt.master_parameters())


def test_masters_keep_precision_that_half_weights_lose(tiny_lm, batches):
    # A learning rate so small that bf16 weights alone could not move: the fp32 masters
    # accumulate the updates, so the model still changes after enough steps.
    opt = HiFTOptimizer(
        tiny_lm, torch.optim.SGD, HiFTConfig(precision="bf16", units_per_group=6), lr=1e-5
    )
    before = {n: p.detach().clone() for n, p in tiny_lm.named_parameters()}
    master_before = None
    for ids in batches:
        lm_loss(tiny_lm, ids).backward()
        opt.step()
        opt.zero_grad()
        if master_before is None:
            master_before = copy.deepcopy(opt.state_dict()["groups"][0]["masters"])
    master_after = opt.state_dict()["groups"][0]["masters"]
    assert any(not torch.equal(a, b) for a, b in zip(master_before, master_after, strict=True))
    assert any(not torch.equal(before[n], p) for n, p in tiny_lm.named_parameters())


def test_fp16_overflow_skips_exactly_that_step(tiny_lm, batches):
    opt = HiFTOptimizer(
        tiny_lm, torch.optim.AdamW, HiFTConfig(precision="fp16", init_loss_scale=1024.0), lr=1e-2
    )
    _train(tiny_lm, opt, batches[:8])  # past one cycle, so every group has state
    active, scale, cycle = opt.active_group, opt.loss_scale, opt.cycle
    weights = {n: p.detach().clone() for n, p in tiny_lm.named_parameters()}
    state = copy.deepcopy(opt.state_dict())  # state_dict() shares tensors, like torch's

    loss = lm_loss(tiny_lm, batches[8])
    opt.scale_loss(loss).backward()
    grads = [p.grad for p in opt.active_parameters()]
    grads[0].view(-1)[0] = float("inf")  # inject an overflow
    opt.step()
    opt.zero_grad()

    assert opt.skipped_steps == 1
    assert opt.loss_scale == scale / 2
    assert (opt.active_group, opt.cycle) == (active, cycle)  # the same group tries again
    for n, p in tiny_lm.named_parameters():
        assert torch.equal(p, weights[n]), n
    after = opt.state_dict()
    for g_before, g_after in zip(state["groups"], after["groups"], strict=True):
        for m_before, m_after in zip(g_before["masters"], g_after["masters"], strict=True):
            assert torch.equal(m_before, m_after)
        for i, s in g_before["optimizer"]["state"].items():
            for k, v in s.items():
                assert torch.equal(v, g_after["optimizer"]["state"][i][k])

    _train(tiny_lm, opt, batches[9:10])  # the next good step goes through
    assert opt.active_group == (active + 1) % opt.num_groups
    assert opt.skipped_steps == 1


def test_fp16_loss_is_scaled_and_grads_unscaled(tiny_lm, batches):
    opt = HiFTOptimizer(
        tiny_lm, torch.optim.SGD, HiFTConfig(precision="fp16", init_loss_scale=256.0), lr=0.0
    )
    loss = torch.tensor(2.0)
    assert opt.scale_loss(loss).item() == 512.0
    lm_loss(tiny_lm, batches[0]).mul(256.0).backward()
    half_grad = opt.active_parameters()[0].grad.float().clone()
    opt.unscale_()
    master_grad = opt.master_parameters()[0].grad
    torch.testing.assert_close(master_grad, half_grad / 256.0)


def test_loss_scaler_grows_after_good_steps():
    scaler = LossScaler(init_scale=8.0, growth_interval=2)
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 16.0
    scaler.update(True)
    assert (scaler.scale, scaler.skipped_steps) == (8.0, 1)
    assert scaler.found_overflow([torch.tensor([1.0, float("nan")])])
    assert not scaler.found_overflow([torch.tensor([1.0])])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_resume_is_exact(batches, precision):
    def make():
        torch.manual_seed(0)
        model = TinyLM()
        return model, HiFTOptimizer(
            model, torch.optim.AdamW, HiFTConfig(precision=precision), lr=1e-2
        )

    model, opt = make()
    _train(model, opt, batches)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}

    model, opt = make()
    _train(model, opt, batches[:7])
    ckpt = {"model": model.state_dict(), "opt": opt.state_dict()}
    model, opt = make()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    _train(model, opt, batches[7:])
    for n, p in model.named_parameters():
        assert torch.equal(p, reference[n]), n
    with pytest.raises(ValueError, match="precision"):
        HiFTOptimizer(TinyLM(), torch.optim.AdamW, lr=1e-2).load_state_dict(ckpt["opt"])
