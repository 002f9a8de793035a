"""HiFT over FSDP2 (fully_shard per unit), 2 gloo processes on CPU, against one plain process."""

from __future__ import annotations

import io
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed.launch import free_port
from hiftune import HiFTConfig, HiFTOptimizer
from hiftune.engine.fsdp import pin_units, shard_by_units
from hiftune.engine.split.units import split_units
from hiftune.engine.state.store import tensor_bytes
from tinymodels import TinyLM, lm_loss

K = len(split_units(TinyLM()))  # groups of one unit each
STEPS = 2 * K
SAVE_AT = K + 2  # mid-cycle


def _micro_batches():
    g = torch.Generator().manual_seed(3)
    return [[torch.randint(0, 32, (4, 12), generator=g) for _ in range(2)] for _ in range(STEPS)]


def _steps(model, opt, data, rows, steps):
    for micro in data[steps.start : steps.stop]:
        for ids in micro:  # gradient accumulation 2
            lm_loss(model, ids[rows]).backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()


def _reference():
    torch.manual_seed(0)
    model = TinyLM()
    opt = HiFTOptimizer(model, torch.optim.AdamW, HiFTConfig(), lr=1e-2)
    _steps(model, opt, _micro_batches(), slice(None), range(STEPS))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _sharded(offload):
    torch.manual_seed(0)
    model = TinyLM()
    config = shard_by_units(model, HiFTConfig(offload=offload))
    return model, HiFTOptimizer(model, torch.optim.AdamW, config, lr=1e-2)


def _worker(rank, world, port, out, offload):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    data = _micro_batches()
    rows = slice(rank * 2, rank * 2 + 2)  # each rank sees half of every micro-batch
    # Without the pinned split, HiFT would have to trace the sharded model (running it in place
    # breaks FSDP2's state, and the first step crashes): refused, pointing at pin_units.
    unpinned = TinyLM()
    shard_by_units(unpinned, HiFTConfig())
    with pytest.raises(ValueError, match="pin_units"):
        HiFTOptimizer(unpinned, torch.optim.AdamW, HiFTConfig(), lr=1e-2)
    model, opt = _sharded(offload)
    with pytest.raises(ValueError, match="sharded already"):
        pin_units(model)
    grads_seen = []
    _steps(model, opt, data, rows, range(SAVE_AT))
    # A checkpoint mid-cycle: each rank saves its own shards and its optimizer's state.
    local = {n: p.to_local().clone() for n, p in model.named_parameters()}
    checkpoint = io.BytesIO()
    torch.save(opt.state_dict(), checkpoint)  # like torch's, the state dict references live state
    for micro in data[SAVE_AT:]:
        for ids in micro:
            lm_loss(model, ids[rows]).backward()
        grads_seen.append({n for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad()
    full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    stored = opt.store.resident_bytes() if offload == "host" else None
    opt.close()

    model2, opt2 = _sharded(offload)
    with torch.no_grad():
        for n, p in model2.named_parameters():
            p.to_local().copy_(local[n])
    checkpoint.seek(0)
    opt2.load_state_dict(torch.load(checkpoint, weights_only=False))
    for micro in data[SAVE_AT:]:
        for ids in micro:
            lm_loss(model2, ids[rows]).backward()
        opt2.step()
        opt2.zero_grad()
    resumed = {n: p.full_tensor().detach().clone() for n, p in model2.named_parameters()}
    torch.save(
        {
            "full": full,
            "resumed": resumed,
            "local_bytes": tensor_bytes([p for p in model.parameters()]),
            "stored": stored,
            "grads": grads_seen,
            "active": [set(g) for g in opt.groups],
        },
        f"{out}.{rank}",
    )
    dist.destroy_process_group()


@pytest.mark.parametrize("offload", ["host", "disk"])
def test_fsdp2_matches_one_process_and_resumes_exactly(tmp_path, offload):
    out = str(tmp_path / "r")
    mp.start_processes(_worker, args=(2, free_port(), out, offload), nprocs=2, start_method="spawn")
    reference = _reference()
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    total = tensor_bytes(list(reference.values()))
    for got in ranks:
        for n, p in reference.items():
            torch.testing.assert_close(got["full"][n], p, atol=1e-5, rtol=1e-4, msg=n)
            assert torch.equal(got["resumed"][n], got["full"][n]), n
        # Each rank holds about half of every parameter (dim-0 shards, the odd row on rank 0).
        assert got["local_bytes"] == pytest.approx(total / 2, rel=0.05)
        # Only the active group got gradients, step after step.
        order = got["active"]
        for step, seen in enumerate(got["grads"], start=SAVE_AT):
            assert seen == order[step % K], step
        if got["stored"] is not None:  # AdamW's two moments of every group, local shards only
            assert got["stored"] == pytest.approx(2 * total / 2, rel=0.05)


def test_pinned_units_are_the_automatic_split():
    model = TinyLM()
    config = pin_units(model)
    assert list(config.units) == [u.name for u in split_units(TinyLM())]
    opt = HiFTOptimizer(model, torch.optim.SGD, config, lr=0.1)
    assert opt.groups == HiFTOptimizer(TinyLM(), torch.optim.SGD, lr=0.1).groups


def test_pin_units_never_splits_a_parameter_into_rows_and_refuses_what_fsdp2_cannot_do():
    # The default budget splits a large embedding into row shards; with FSDP2 it gives way.
    model = TinyLM(vocab=4096)
    assert any(u.rows for u in split_units(model))
    config = pin_units(model)
    opt = HiFTOptimizer(model, torch.optim.SGD, config, lr=0.1)
    assert all(not u.rows for u in opt.units)
    assert sum(len(names) for names in opt.groups) == len(list(model.parameters()))
    opt.close()
    with pytest.raises(ValueError, match="rows of a parameter"):
        pin_units(TinyLM(), HiFTConfig(max_unit_params=600))
    with pytest.raises(ValueError, match="fp32"):
        pin_units(TinyLM(), HiFTConfig(precision="bf16"))
    with pytest.raises(ValueError, match="shard_state"):
        pin_units(TinyLM(), HiFTConfig(shard_state=True))
