"""Paging on CUDA: pinned host copies and side-stream prefetch must not change a single bit.

On a CPU the host store keeps tensors where they are, so only a GPU exercises the pinned,
non-blocking copies and the prefetch stream. Every test here is marked ``gpu`` and skipped
(by ``tests/conftest.py``) where CUDA is not available.
"""

import os

import pytest
import torch

from hiftune import DiskStore, HiFTConfig, HiFTOptimizer
from hiftune.engine.state.host import HostStore
from tinymodels import TinyLM, lm_loss, snapshot

pytestmark = pytest.mark.gpu

STEPS = 14  # two cycles of k = 6, and two steps into the third


@pytest.fixture
def deterministic():
    """Deterministic CUDA kernels (the embedding backward uses atomics otherwise)."""
    # cuBLAS reads this when it creates its handle: before the first matmul of the process.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def _train(batches, tmp_path, offload, precision):
    torch.manual_seed(0)
    model = TinyLM().cuda()
    extra = {"offload_dir": str(tmp_path / offload)} if offload == "disk" else {}
    config = HiFTConfig(offload=offload, precision=precision, prefetch=True, **extra)
    opt = HiFTOptimizer(model, torch.optim.AdamW, config, lr=1e-2)
    for ids in batches[:STEPS]:
        loss = lm_loss(model, ids.cuda())
        opt.scale_loss(loss).backward()
        opt.step()
        opt.zero_grad()
    torch.cuda.synchronize()
    weights = snapshot(model)
    opt.close()
    return weights


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("offload", ["host", "disk"])
def test_paging_on_cuda_is_bit_identical_to_no_paging(
    batches, tmp_path, deterministic, offload, precision
):
    reference = _train(batches, tmp_path, "none", precision)
    paged = _train(batches, tmp_path, offload, precision)
    for n, p in reference.items():
        assert p.is_cuda and torch.equal(paged[n], p), n


def test_host_store_pins_and_prefetches_back_to_the_device():
    store = HostStore()
    t = torch.randn(64, 32, device="cuda")
    expected = t.clone()
    store.put(0, {"t": t})
    store.flush()
    assert store.peek(0)["t"].is_pinned()
    assert store.resident_bytes() == t.numel() * t.element_size()
    store.prefetch(0)  # copies back on a side stream
    back = store.get(0)["t"]  # the compute stream waits for that copy
    assert back.device == expected.device and torch.equal(back, expected)


def test_disk_store_brings_tensors_back_to_their_device(tmp_path):
    store = DiskStore(tmp_path)
    t = torch.randn(8, device="cuda")
    store.put(0, {"t": t.clone()})
    store.prefetch(0)
    back = store.get(0)["t"]
    assert back.device == t.device and torch.equal(back, t)
    store.close()


BUSY = int(1e8)  # GPU clock cycles of torch.cuda._sleep: tens of milliseconds


def _poison(n: int) -> None:
    """Leaves -1 in the caching allocator's free blocks, so unwritten memory shows as -1."""
    torch.full((n,), -1.0, device="cuda")
    torch.cuda.synchronize()


@pytest.mark.parametrize("store_type", ["host", "disk"])
def test_stores_wait_for_the_busy_step_and_for_their_copies(store_type, tmp_path):
    # A store that forgot a stream wait copies the state before the (delayed) step wrote it, or
    # hands back a tensor its copy-in has not filled yet: wrong data, not an error.
    n = 16 * 2**20
    store = HostStore() if store_type == "host" else DiskStore(tmp_path)
    t = torch.zeros(n, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(BUSY)
    t.fill_(1.0)
    store.put(0, {"t": t})
    del t
    assert bool((store.peek(0)["t"] == 1).all())  # what state_dict() reads
    _poison(n)
    store.prefetch(0)
    back = store.get(0)["t"]
    assert bool((back.clone() == 1).all())
    torch.cuda._sleep(BUSY)
    back.fill_(2.0)
    store.put(0, {"t": back})
    del back
    _poison(n)
    assert bool((store.get(0)["t"] == 2).all())
    store.close()
