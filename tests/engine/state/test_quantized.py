"""8-bit Adam moments in the store (engine/state/quantized.py): bytes, error bounds, training."""

import pytest
import torch

from hiftune import HiFTConfig, HiFTOptimizer
from hiftune.engine.state.paging import make_store
from hiftune.engine.state.store import KeepStore
from tinymodels import TinyLM, train_steps

quantized = pytest.importorskip("hiftune.engine.state.quantized")
pytest.importorskip("bitsandbytes")


def test_moments_go_in_as_one_byte_per_element_and_come_back_close():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(64, 80, generator=g) * 1e-3
    v = torch.rand(64, 80, generator=g) ** 4 * 1e-6  # second moments span decades
    small = torch.randn(10)
    store = quantized.Int8MomentStore(KeepStore())
    tensors = {"state.0.exp_avg": m, "state.0.exp_avg_sq": v, "state.1.exp_avg": small}
    tensors["master.0"] = torch.randn(5)
    store.put(3, dict(tensors))
    n = m.numel()
    assert store.resident_bytes() == 2 * (n + 4 * n // quantized.BLOCK) + 4 * 10 + 4 * 5
    back = store.get(3)
    assert back.keys() == tensors.keys()
    assert torch.equal(back["state.1.exp_avg"], small)  # under min_numel: whole
    assert torch.equal(back["master.0"], tensors["master.0"])  # not a moment: whole
    for name, bound in (("state.0.exp_avg", 0.02), ("state.0.exp_avg_sq", 0.02)):
        t = tensors[name]
        # Dynamic 8-bit codes: error relative to each block's largest magnitude.
        scale = t.abs().reshape(-1, quantized.BLOCK).amax(1, keepdim=True)
        err = (back[name] - t).abs().reshape(-1, quantized.BLOCK) / scale
        assert back[name].shape == t.shape and err.max() < bound, name
    assert (back["state.0.exp_avg_sq"] >= 0).all()  # an unsigned code: no negative variance


def test_training_with_8bit_moments_stays_close_to_fp32_moments():
    def run(store):
        torch.manual_seed(0)
        model = TinyLM(vocab=200, d=64)
        opt = HiFTOptimizer(model, torch.optim.AdamW, HiFTConfig(precision="bf16"), store=store)
        g = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, 200, (2, 12), generator=g) for _ in range(2 * opt.num_groups)]
        losses = train_steps(model, opt, batches)
        state = opt.state_dict()  # restored fp32 moments: a checkpoint like any other
        return losses, model, state

    exact, model_a, _ = run(make_store("host"))
    approx, model_b, state = run(quantized.Int8MomentStore(make_store("host"), min_numel=256))
    assert abs(sum(approx[-4:]) - sum(exact[-4:])) / sum(exact[-4:]) < 0.02
    pairs = zip(model_a.state_dict().values(), model_b.state_dict().values(), strict=True)
    gaps = [(a.float() - b.float()).abs().max().item() for a, b in pairs]
    assert 0 < max(gaps) < 5e-3  # inexact, as documented, but by little
    moments = [
        s["exp_avg"]
        for g in state["groups"]
        if g.get("optimizer")
        for s in g["optimizer"]["state"].values()
    ]
    assert moments and all(m.dtype == torch.float32 for m in moments)
