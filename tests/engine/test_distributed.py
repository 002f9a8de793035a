"""Data parallelism without DDP: HiFT averages the active group's gradients over ranks."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hiftune import HiFTConfig, HiFTOptimizer
from tinymodels import TinyLM, lm_loss

STEPS = 8


def _data():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 32, (4, 12), generator=g) for _ in range(STEPS)]


def _train(ids_for_step, precision="fp32"):
    torch.manual_seed(0)
    model = TinyLM()
    opt = HiFTOptimizer(model, torch.optim.AdamW, HiFTConfig(precision=precision), lr=1e-2)
    for step in range(STEPS):
        lm_loss(model, ids_for_step(step)).backward()
        opt.clip_grad_norm_(0.5)  # clipping must see the averaged gradients on every rank
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    data = _data()
    # Each rank sees half of every batch; equal halves, so the mean of the two losses' gradients
    # equals the full batch's gradient.
    weights = _train(lambda s: data[s][rank * 2 : rank * 2 + 2])
    torch.save(weights, f"{out}.{rank}")
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_one_process_on_the_full_batch(tmp_path):
    out = str(tmp_path / "w")
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, start_method="spawn")
    data = _data()
    reference = _train(lambda s: data[s])
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for n, p in reference.items():
        assert torch.equal(ranks[0][n], ranks[1][n]), n  # the ranks stay in lockstep
        torch.testing.assert_close(ranks[0][n], p, atol=1e-5, rtol=1e-4, msg=n)


def test_sync_gradients_is_validated():
    with pytest.raises(ValueError, match="sync_gradients"):
        HiFTConfig(sync_gradients="yes")
