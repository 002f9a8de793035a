"""The host store's CUDA logic on a CPU: per-device events, side streams, one pinned buffer per group.

``FakeCuda`` stands in for :class:`hiftune.engine.state.cuda.Cuda`: tensors marked as on
``cuda:<i>`` stay CPU tensors, and every queued copy (or "kernel" a test launches) runs only when
stream order makes it run: a stream runs its queue when an event recorded on it is synchronised,
or when a stream that waits for it runs. A missing wait therefore reads stale or garbage data,
as on a busy GPU.
"""

import gc

import torch

from hiftune.engine.state.host import HostStore

GARBAGE = 0xAB  # what a fresh pinned buffer, or a copy that has not run, holds


class FakeStream:
    def __init__(self, name):
        self.name = name
        self.queue = []
        self.done = 0

    def run_until(self, n):
        while self.done < n:
            op = self.queue[self.done]
            self.done += 1
            op()

    def run(self):
        self.run_until(len(self.queue))

    def wait_stream(self, other):
        mark = len(other.queue)
        self.queue.append(lambda: other.run_until(mark))

    def wait_event(self, event):
        self.queue.append(event.synchronize)


class FakeEvent:
    def __init__(self, log):
        self.stream = None
        self.log = log

    def record(self, stream):
        self.stream, self.mark = stream, len(stream.queue)

    def synchronize(self):
        self.log.append(("synchronize", self.stream.name))
        self.stream.run_until(self.mark)


class Copy:
    """A queued copy, and which storages it touches."""

    def __init__(self, dst, src):
        self.dst, self.src, self.ran = dst, src, False
        self.storages = {t.untyped_storage().data_ptr() for t in (dst, src)}

    def __call__(self):
        self.dst.copy_(self.src)
        self.ran = True


class FakeCuda:
    def __init__(self):
        self.placed = {}  # id(tensor) -> device
        self.streams = {}
        self.log = []
        self.buffers = []  # every buffer pinned
        self.unpinned = []
        self.copies = []

    def place(self, device, **tensors):
        for t in tensors.values():
            self.placed[id(t)] = torch.device(device)
        return tensors

    def launch(self, device, fn):
        """Queues ``fn`` on ``device``'s compute stream: it runs when stream order says so."""
        self.current_stream(torch.device(device)).queue.append(fn)

    def synchronize(self):
        for stream in list(self.streams.values()):
            stream.run()

    # The interface of hiftune.engine.state.cuda.Cuda.
    def device(self, t):
        return self.placed.get(id(t))

    def current_stream(self, device):
        return self._stream(f"{device}/compute")

    def side_stream(self, device, role):
        return self._stream(f"{device}/{role}")

    def _stream(self, name):
        return self.streams.setdefault(name, FakeStream(name))

    def event(self):
        return FakeEvent(self.log)

    def copy_out(self, dst, src, stream):
        self.log.append(("record_stream", stream.name))
        stream.queue.append(self._copy(dst, src))

    def copy_in(self, src, device, stream):
        out = torch.empty_like(src)
        out.reshape(-1).view(torch.uint8).fill_(GARBAGE)  # not copied yet
        stream.queue.append(self._copy(out, src))
        self.placed[id(out)] = device
        return out

    def _copy(self, dst, src):
        copy = Copy(dst, src)
        self.copies.append(copy)
        return copy

    def use_on(self, t, stream):
        self.log.append(("use_on", stream.name))

    def pinned(self, nbytes):
        buffer = torch.full((nbytes,), GARBAGE, dtype=torch.uint8)
        self.buffers.append(buffer)
        return buffer

    def unpin(self, buffer):
        # Memory a queued copy still reads or writes must not be unpinned (and then freed).
        ptr = buffer.untyped_storage().data_ptr()
        assert not [c for c in self.copies if not c.ran and ptr in c.storages], "copy in flight"
        self.unpinned.append(buffer)


def _group():
    return {
        "state.0.exp_avg": torch.randn(4, 3),
        "state.0.exp_avg_sq": torch.rand(5, dtype=torch.bfloat16),
        "state.1.count": torch.tensor(7, dtype=torch.int64),
        "state.1.mask": torch.tensor([True, False, True]),
        "master.0": torch.randn(2, 2).t(),  # strided
    }


def _split(fake, group):
    # Two tensors on each of two GPUs, the last one on the CPU (as Adam's ``step`` counter).
    names = list(group)
    fake.place("cuda:0", **{n: group[n] for n in names[:2]})
    fake.place("cuda:1", **{n: group[n] for n in names[2:4]})
    return group


def _equal(got, expected):
    assert got.keys() == expected.keys()
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_peek_waits_for_the_copy_out_on_every_device_of_a_group():
    # A group on two GPUs whose state the step is still writing when it is paged out: peek (and so
    # state_dict()) must wait for both devices' copies, not only the current device's.
    fake = FakeCuda()
    store = HostStore(cuda=fake)
    group = _split(fake, _group())
    expected = {k: ~v if v.dtype == torch.bool else v + 1 for k, v in group.items()}
    for name, t in group.items():
        step = lambda t=t, new=expected[name]: t.copy_(new)  # noqa: E731
        if fake.device(t) is not None:
            fake.launch(fake.device(t), step)  # the step that wrote it, still queued
        else:
            step()
    store.put(0, group)
    got = store.peek(0)
    _equal(got, expected)
    assert {s for op, s in fake.log if op == "synchronize"} == {"cuda:0/out", "cuda:1/out"}
    assert {s for op, s in fake.log if op == "record_stream"} == {"cuda:0/out", "cuda:1/out"}
    store.close()


def test_get_without_prefetch_waits_for_the_copy_out_on_each_device():
    fake = FakeCuda()
    store = HostStore(cuda=fake)
    group = _split(fake, _group())
    expected = {k: v.clone() for k, v in group.items()}
    store.put(0, group)
    back = store.get(0)  # copies in on each compute stream, after that device's copy out
    for device in ("cuda:0", "cuda:1"):
        fake.current_stream(torch.device(device)).run()  # the step runs; the copies out may not
    _equal(back, expected)
    assert 0 not in store
    store.close()


def test_prefetch_copies_each_device_back_on_its_own_stream():
    fake = FakeCuda()
    store = HostStore(cuda=fake)
    group = _split(fake, _group())
    expected = {k: v.clone() for k, v in group.items()}
    store.put(0, group)
    store.prefetch(0)
    back = store.get(0)
    seen = {}
    for name, t in back.items():  # the step reads them on the compute streams
        device = fake.device(t)
        if device is not None:
            fake.launch(device, lambda n=name, t=t: seen.__setitem__(n, t.clone()))
        else:
            seen[name] = t
    for device in ("cuda:0", "cuda:1"):
        fake.current_stream(torch.device(device)).run()
    _equal(seen, expected)
    assert {s for op, s in fake.log if op == "use_on"} == {"cuda:0/compute", "cuda:1/compute"}
    store.close()


def test_a_group_on_its_way_back_can_be_peeked():
    fake = FakeCuda()
    store = HostStore(cuda=fake)
    group = _split(fake, _group())
    expected = {k: v.clone() for k, v in group.items()}
    store.put(0, group)
    store.prefetch(0)
    assert 0 in store and store.resident_bytes() == sum(
        t.numel() * t.element_size() for t in expected.values()
    )
    _equal(store.peek(0), expected)
    store.close()


def test_one_pinned_buffer_per_group_reused_by_every_put_and_released_on_close():
    fake = FakeCuda()
    store = HostStore(cuda=fake)
    for cycle in range(3):
        group = fake.place("cuda:0", **{k: v + cycle for k, v in _group().items()})
        expected = {k: v.clone() for k, v in group.items()}
        store.put(0, group)
        peeked = store.peek(0)
        _equal(peeked, expected)
        assert len(fake.buffers) == 1  # made by the first put, reused since
        buffer = fake.buffers[0]
        for t in peeked.values():  # the stored tensors are views of it
            assert t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        assert store.resident_bytes() == sum(
            t.numel() * t.element_size() for t in expected.values()
        )
        store.prefetch(0)
        back = store.get(0)
        fake.synchronize()
        _equal(back, expected)
    assert store.pinned_bytes() == buffer.numel() and buffer.numel() % 64 == 0
    assert fake.unpinned == []
    store.close()
    assert fake.unpinned == [buffer] and store.pinned_bytes() == 0


def test_a_group_whose_sizes_change_gets_a_new_buffer_once_the_old_is_idle():
    fake = FakeCuda()
    store = HostStore(cuda=fake)
    small = fake.place("cuda:0", a=torch.ones(3))
    store.put(0, small)
    store.prefetch(0)  # a copy in that reads the first buffer, still queued
    back = store.get(0)
    large = fake.place("cuda:0", a=torch.ones(3), b=torch.full((100,), 2.0))  # state appeared
    store.put(0, large)
    assert len(fake.buffers) == 2 and fake.unpinned == [fake.buffers[0]]
    assert torch.equal(back["a"], torch.ones(3))  # the old buffer was read before it was freed
    _equal(store.peek(0), {"a": torch.ones(3), "b": torch.full((100,), 2.0)})
    store.close()


def test_tensors_off_cuda_stay_in_place_and_need_no_buffer():
    fake = FakeCuda()
    store = HostStore(cuda=fake)
    t = torch.ones(3)
    store.put(0, {"a": t})
    store.prefetch(0)
    assert store.get(0)["a"] is t
    assert fake.buffers == [] and fake.streams == {}


def test_buffers_are_released_when_the_store_is_collected():
    fake = FakeCuda()
    store = HostStore(cuda=fake)
    store.put(0, fake.place("cuda:0", a=torch.ones(3)))
    peeked = store.peek(0)["a"]
    del store
    gc.collect()
    assert fake.unpinned == fake.buffers and len(fake.buffers) == 1
    assert torch.equal(peeked, torch.ones(3))  # a view outlives the store as plain memory
