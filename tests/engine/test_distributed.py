"""Data parallelism without DDP: HiFT averages the active group's gradients over ranks."""

import io
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hiftune import HiFTConfig, HiFTOptimizer
from hiftune.engine.distributed import all_reduce_mean
from hiftune.engine.split.units import split_units
from hiftune.engine.state.store import tensor_bytes
from tinymodels import TinyLM, lm_loss

STEPS = 8


def _data():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 32, (4, 12), generator=g) for _ in range(STEPS)]


#: The schedule options (tests/engine/test_schedule.py) under data parallelism.
SCHEDULE = {"always_active": (r"lm_head\..*",), "always_active_lr_scale": 3.0, "steps_per_group": 2}


def _train(ids_for_step, precision="fp32", **schedule):
    torch.manual_seed(0)
    model = TinyLM()
    config = HiFTConfig(precision=precision, **schedule)
    opt = HiFTOptimizer(model, torch.optim.AdamW, config, lr=1e-2)
    for step in range(STEPS):
        lm_loss(model, ids_for_step(step)).backward()
        opt.clip_grad_norm_(0.5)  # clipping must see the averaged gradients on every rank
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _worker(rank, world, port, out, schedule=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    data = _data()
    # Each rank sees half of every batch; equal halves, so the mean of the two losses' gradients
    # equals the full batch's gradient.
    weights = _train(lambda s: data[s][rank * 2 : rank * 2 + 2], **(schedule or {}))
    torch.save(weights, f"{out}.{rank}")
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("schedule", [{}, SCHEDULE], ids=["paper", "schedule-options"])
def test_two_ranks_match_one_process_on_the_full_batch(tmp_path, schedule):
    out = str(tmp_path / "w")
    mp.start_processes(
        _worker, args=(2, _free_port(), out, schedule), nprocs=2, start_method="spawn"
    )
    data = _data()
    reference = _train(lambda s: data[s], **schedule)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for n, p in reference.items():
        assert torch.equal(ranks[0][n], ranks[1][n]), n  # the ranks stay in lockstep
        torch.testing.assert_close(ranks[0][n], p, atol=1e-5, rtol=1e-4, msg=n)


K = len(split_units(TinyLM()))  # groups of one unit each
CYCLES2 = 2 * K
SAVE_AT = K + 2  # mid-cycle


def _batches():
    g = torch.Generator().manual_seed(4)
    return [torch.randint(0, 32, (4, 12), generator=g) for _ in range(CYCLES2)]


def _run(model, opt, data, rows, steps):
    for s in steps:
        lm_loss(model, data[s][rows]).backward()
        opt.clip_grad_norm_(0.5)
        opt.step()
        opt.zero_grad()


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _sharding_worker(rank, world, port, out, optimizer):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    data = _batches()
    rows = slice(rank * 2, rank * 2 + 2)
    result = {}
    for shard in (False, True):
        torch.manual_seed(0)
        model = TinyLM()
        config = HiFTConfig(shard_state=shard)
        opt = HiFTOptimizer(model, optimizer, config, lr=1e-2)
        _run(model, opt, data, rows, range(SAVE_AT))
        saved_weights = _snapshot(model)
        state = opt.state_dict()  # with shard_state: a collective
        # Each rank loads its own dict back, as accelerate's optimizer wrapper does when the
        # Trainer prepares it: a non-saving rank's placeholders are groups it keeps nothing of.
        opt.load_state_dict(state)
        checkpoint = io.BytesIO()
        torch.save(state, checkpoint)
        path = f"{out}.checkpoint.{shard}"
        if rank == 0:  # the saving rank, as the Trainer's
            with open(path, "wb") as f:
                f.write(checkpoint.getvalue())
        dist.barrier()
        _run(model, opt, data, rows, range(SAVE_AT, CYCLES2))
        result[shard] = {
            "weights": _snapshot(model),
            "stored": opt.store.resident_bytes(),
            "checkpoint": checkpoint.getvalue(),
            "checkpoint_bytes": tensor_bytes(state["groups"]),
            "saved_weights": saved_weights,
        }
        del state
        opt.close()
        # Every rank resumes mid-cycle from the saving rank's checkpoint, in the same mode.
        model = TinyLM()
        model.load_state_dict(saved_weights)
        opt = HiFTOptimizer(model, optimizer, config, lr=1e-2)
        opt.load_state_dict(torch.load(path, weights_only=True))
        _run(model, opt, data, rows, range(SAVE_AT, CYCLES2))
        result[shard]["resumed"] = _snapshot(model)
        opt.close()
    torch.save(result, f"{out}.{rank}")
    dist.destroy_process_group()


class Adamish(torch.optim.Optimizer):
    """An optimizer hiftune has never seen (sign of a momentum), to show "any optimizer"."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("m", torch.zeros_like(p))
                m.mul_(0.9).add_(p.grad)
                p.add_(m.sign(), alpha=-group["lr"])


@pytest.mark.parametrize("optimizer", [torch.optim.AdamW, Adamish])
def test_sharded_state_equals_unsharded_with_half_the_state_per_rank(tmp_path, optimizer):
    out = str(tmp_path / "r")
    mp.start_processes(
        _sharding_worker, args=(2, _free_port(), out, optimizer), nprocs=2, start_method="spawn"
    )
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for got in ranks:
        for n, p in got[False]["weights"].items():
            assert torch.equal(got[True]["weights"][n], p), n  # bit for bit
            assert torch.equal(got[True]["resumed"][n], p), n  # resumed mid-cycle: exact
            assert torch.equal(got[False]["resumed"][n], p), n
    # Each rank stores only the groups it owns (b % 2 == rank); together, everything once.
    full = ranks[0][False]["stored"]
    assert ranks[1][False]["stored"] == full > 0
    shares = [got[True]["stored"] for got in ranks]
    assert sum(shares) == full
    assert max(shares) <= 0.6 * full
    # Only the saving rank holds every group; the other keeps its own share, not a copy of all.
    for shard in (False, True):
        assert ranks[0][shard]["checkpoint_bytes"] == ranks[0][False]["checkpoint_bytes"] > 0
    assert ranks[1][True]["checkpoint_bytes"] <= 0.6 * ranks[0][True]["checkpoint_bytes"]
    # A non-saving rank's state dict lacks the other rank's groups: refused, never half-loaded.
    opt = HiFTOptimizer(TinyLM(), optimizer, HiFTConfig(), lr=1e-2)
    partial = torch.load(io.BytesIO(ranks[1][True]["checkpoint"]), weights_only=True)
    with pytest.raises(ValueError, match="has no optimizer state"):
        opt.load_state_dict(partial)
    opt.close()
    # The checkpoints of both modes hold the same (full) state: one loads into the other, or into
    # one process (another number of ranks).
    torch.manual_seed(0)
    model = TinyLM()
    model.load_state_dict(ranks[0][True]["saved_weights"])
    opt = HiFTOptimizer(model, optimizer, HiFTConfig(), lr=1e-2)
    opt.load_state_dict(torch.load(io.BytesIO(ranks[0][True]["checkpoint"]), weights_only=True))
    _run(model, opt, _batches(), slice(None), range(SAVE_AT, CYCLES2))
    for n, p in _snapshot(model).items():
        torch.testing.assert_close(p, ranks[0][True]["weights"][n], atol=1e-5, rtol=1e-4, msg=n)


def test_shard_state_is_validated():
    with pytest.raises(ValueError, match="shard_state"):
        HiFTConfig(shard_state=True, precision="bf16")


def test_sync_gradients_is_validated():
    with pytest.raises(ValueError, match="sync_gradients"):
        HiFTConfig(sync_gradients="yes")


class _FakeRanks:
    """``torch.distributed`` for one process that stands for three ranks: the other two hold
    ``others`` times this rank's values, and the sum runs in the buffer's dtype, one rank at a
    time, as a ring all-reduce adds."""

    def __init__(self, others):
        self.others = others
        self.dtypes = []

    def get_world_size(self):
        return 1 + len(self.others)

    def all_reduce(self, t):
        self.dtypes.append(t.dtype)
        mine = t.clone()
        for factor in self.others:
            t.add_(mine * factor)


@pytest.mark.parametrize(
    ("dtype", "value", "others", "mean"),
    [
        # 30000 * 3 overflows fp16: the mean was inf.
        (torch.float16, 30000.0, (1.0, 1.0), 30000.0),
        # bf16 rounds 1 + 2**-8 to 1 at each addition: (1 + 2 * 2**-8) / 3 was 0.333984375.
        (torch.bfloat16, 1.0, (2**-8, 2**-8), 0.3359375),
    ],
)
@pytest.mark.parametrize("bucket_bytes", [2**20, 8], ids=["one-bucket", "chunked"])
def test_half_gradients_are_summed_in_fp32(monkeypatch, dtype, value, others, mean, bucket_bytes):
    fake = _FakeRanks(others)
    monkeypatch.setattr(torch.distributed, "all_reduce", fake.all_reduce)
    monkeypatch.setattr(torch.distributed, "get_world_size", fake.get_world_size)
    params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape in (6, 6, (3, 2))]
    for p in params:
        p.grad = torch.full_like(p, value)
    params[2].grad = torch.full((2, 3), value, dtype=dtype).t()  # a strided gradient
    all_reduce_mean(params, bucket_bytes=bucket_bytes)
    assert set(fake.dtypes) == {torch.float32}
    for p in params:
        assert p.grad.dtype == dtype and torch.equal(p.grad, torch.full_like(p, mean))
    assert params[2].grad.stride() == (1, 3)  # averaged in place, layout kept
