"""The state stores: round trips, atomic disk files, cleanup, flush, clear errors, memory given
back."""

import gc
import json
import os
import shutil
import subprocess
import sys
import weakref

import pytest
import torch

from hiftune.engine.state import paging
from hiftune.engine.state.host import HostStore
from hiftune.engine.state.paging import DiskStore
from hiftune.engine.state.store import KeepStore


def _tensors():
    return {"state.0.exp_avg": torch.randn(4, 3), "state.0.step": torch.tensor(3.0)}


@pytest.mark.parametrize("store_cls", [KeepStore, HostStore, DiskStore])
def test_round_trip(store_cls):
    store = store_cls()
    data = _tensors()
    expected = {k: v.clone() for k, v in data.items()}
    store.put(7, data)
    assert 7 in store
    assert {k: torch.equal(v, expected[k]) for k, v in store.peek(7).items()} == {
        k: True for k in expected
    }
    store.prefetch(7)
    back = store.get(7)
    assert 7 not in store
    for k, v in expected.items():
        assert torch.equal(back[k], v) and back[k].device == v.device
    store.close()


def test_host_store_on_cpu_keeps_tensors_in_place():
    store = HostStore()
    t = torch.ones(3)
    store.put(0, {"a": t})
    assert store.get(0)["a"] is t


def test_disk_store_writes_atomically_and_cleans_up(tmp_path):
    store = DiskStore(tmp_path / "state")
    store.put(1, _tensors())
    store.flush()
    files = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert files == ["group_0001.safetensors"]  # no temporary file left behind
    store.close()
    assert list((tmp_path / "state").iterdir()) == []


def test_disk_store_temporary_directory_is_removed_when_collected():
    store = DiskStore()
    directory = store.directory
    store.put(0, _tensors())
    assert directory.exists()
    del store
    gc.collect()
    assert not directory.exists()


def test_corrupt_or_missing_state_file_is_a_clear_error(tmp_path):
    store = DiskStore(tmp_path)
    store.put(0, _tensors())
    store.flush()
    store.path(0).write_bytes(b"this is not a safetensors file")
    with pytest.raises(RuntimeError, match="corrupt or unreadable"):
        store.get(0)
    store.put(1, _tensors())
    store.flush()
    store.path(1).unlink()
    with pytest.raises(RuntimeError, match="is missing"):
        store.get(1)
    store.close()


def test_unwritable_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot create offload_dir"):
        DiskStore(blocker / "sub")


def test_disk_put_waits_for_its_write_unless_write_behind(tmp_path):
    store = DiskStore(tmp_path / "a")
    store.put(0, _tensors())
    assert store.path(0).exists() and store.resident_bytes() == 0
    behind = DiskStore(tmp_path / "b", write_behind=True)
    behind.put(0, _tensors())
    behind.flush()
    assert behind.path(0).exists()
    behind.prefetch(0)
    behind.flush()
    assert behind.resident_bytes() == 4 * 3 * 4 + 4  # the prefetched tensors are in memory
    store.close()
    behind.close()


def test_resident_bytes_of_memory_stores():
    for store in (KeepStore(), HostStore()):
        store.put(0, _tensors())
        assert store.resident_bytes() == 4 * 3 * 4 + 4


def test_optimizer_accepts_a_store_of_its_own(tiny_lm, batches):
    from hiftune import HiFTOptimizer
    from tinymodels import lm_loss

    class CountingStore(KeepStore):
        puts = 0

        def put(self, key, tensors):
            CountingStore.puts += 1
            super().put(key, tensors)

    opt = HiFTOptimizer(tiny_lm, torch.optim.SGD, store=CountingStore(), lr=0.1, momentum=0.9)
    assert isinstance(opt.store, CountingStore)
    before = CountingStore.puts
    for ids in batches[:3]:
        lm_loss(tiny_lm, ids).backward()
        opt.step()
        opt.zero_grad()
    assert CountingStore.puts == before + 3


def test_flush_waits_for_every_write_behind(tmp_path):
    store = DiskStore(tmp_path, write_behind=True)
    expected = [_tensors() for _ in range(3)]
    for key in range(3):
        store.put(key, {k: v.clone() for k, v in expected[key].items()})
    store.flush()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"group_000{key}.safetensors" for key in range(3)
    ]
    assert store.resident_bytes() == 0  # nothing in flight any more
    for key in range(3):
        assert all(torch.equal(v, expected[key][k]) for k, v in store.peek(key).items())
    store.close()


def test_flush_raises_a_failed_write_behind(tmp_path):
    store = DiskStore(tmp_path / "state", write_behind=True)
    shutil.rmtree(tmp_path / "state")  # the write cannot succeed, but put() does not wait for it
    store.put(0, _tensors())
    with pytest.raises(RuntimeError, match="could not write optimizer state"):
        store.flush()
    store.close()


@pytest.mark.parametrize("store_cls", [KeepStore, HostStore])
def test_flush_of_memory_stores_changes_nothing(store_cls):
    store = store_cls()
    t = torch.ones(3)
    store.put(0, {"a": t})
    store.flush()
    assert 0 in store and torch.equal(store.get(0)["a"], t)


@pytest.mark.parametrize("store_cls", [HostStore, DiskStore])
def test_sharded_tensors_round_trip_through_their_local_shard(tmp_path, store_cls):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        mesh = init_device_mesh("cpu", (1,))
        full = torch.arange(12.0).reshape(4, 3)
        sharded = distribute_tensor(full, mesh, [Shard(0)])
        store = store_cls() if store_cls is HostStore else store_cls(tmp_path / "state")
        store.put(0, {"state.0.exp_avg": sharded, "state.0.step": torch.tensor(3.0)})
        peeked = store.peek(0)["state.0.exp_avg"]
        back = store.get(0)
        for t in (peeked, back["state.0.exp_avg"]):
            assert isinstance(t, DTensor) and t.placements == (Shard(0),)
            assert torch.equal(t.full_tensor(), full)
        assert not isinstance(back["state.0.step"], DTensor)
        store.close()
    finally:
        dist.destroy_process_group()


class _Buffer(bytearray):
    """Memory a tensor can be built on (``torch.frombuffer``) whose release a weakref can see."""


def test_disk_put_keeps_no_reference_once_it_returns(tmp_path):
    # The write thread must not outlive put() holding the group: if the caller's reference is the
    # last one, the group's memory is free as soon as the caller drops it. (A thread that lets go
    # a little later loses that race some of the time: hence several rounds.)
    store = DiskStore(tmp_path)
    for step in range(20):
        buffer = _Buffer(torch.full((6,), float(step)).numpy().tobytes())
        alive = weakref.ref(buffer)
        tensors = {"master.0": torch.frombuffer(buffer, dtype=torch.float32)}
        del buffer
        store.put(0, tensors)
        del tensors
        assert alive() is None
        assert torch.equal(store.get(0)["master.0"], torch.full((6,), float(step)))
    store.close()


_CYCLES = """
import json, os, torch
from hiftune.engine.state import paging
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
# Groups of different tensor sizes, as a model's embedding shards and blocks are.
sizes = [(8, 2**20), (3, 3 * 2**19), (12, 2**18), (5, 3 * 2**18)]
block = torch.ones(10 * 2**20)
del block  # once a large block is freed, glibc serves smaller ones from its heap
store = paging.DiskStore(release_memory={release})
base = rss()
for cycle in range(3):
    for key, (n, numel) in enumerate(sizes):
        store.prefetch(key)
        state = store.get(key) or {{f"state.{{i}}": torch.zeros(numel) for i in range(n)}}
        grads = [torch.full((numel,), key + 1.0) for _ in range(n)]  # what a step allocates
        for t, g in zip(state.values(), grads):
            t.add_(g)
        del grads
        store.put(key, state)
        del state
growth = rss() - base
values = [sorted({{x for t in store.get(k).values() for x in t.unique().tolist()}}) for k in range(4)]
print(json.dumps({{"growth": growth, "largest": 8 * 2**20 * 4, "values": values}}))
"""


@pytest.mark.skipif(paging._MALLOC_TRIM is None, reason="needs glibc's malloc_trim")
def test_disk_paging_gives_freed_state_back_to_the_os():
    # Everything is paged out at the end, so the process should hold hardly more than before the
    # first group; a fresh process, for a heap that holds nothing else. The same run without
    # giving memory back is the reference: glibc keeps the holes and the resident set grows.
    def run(release: bool) -> dict:
        script = _CYCLES.format(release=release)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        return json.loads(out.stdout)

    released, kept = run(release=True), run(release=False)
    expected = [[3.0 * (key + 1)] for key in range(4)]  # each group stepped once per cycle, exactly
    assert released["values"] == kept["values"] == expected
    assert released["growth"] < released["largest"] < kept["growth"]
