"""``offload="host"``: the state of inactive groups in host memory.

On CUDA each group gets one flat pinned host buffer, made the first time the group is paged out
(again only if its tensors' sizes change) and kept until :meth:`HostStore.close`: every later
page-out copies into it, so no step allocates (or leaks) pinned memory, and the stored tensors are
views of it. Copies run on side streams of each tensor's own device, each direction on its own:

* out (:meth:`~HostStore.put`): the copy stream waits for the device's compute stream (the step
  that wrote the state), copies, and records an event; the compute stream goes on with the next
  forward at once.
* in (:meth:`~HostStore.prefetch`): the copy-in stream waits for that event, copies, records an
  event that :meth:`~HostStore.get` makes the compute stream wait for. Without a prefetch,
  :meth:`~HostStore.get` copies on the compute stream, after waiting for the copy out.

Every event is per device: a group may span GPUs (``device_map="auto"``), and an event on one
device's stream says nothing about another's. Reading a buffer on the host (:meth:`peek`, and
so ``state_dict()``) first waits for every device's copy out; a buffer is written again only after
the copies that read it (stream waits) and freed only after they ran (host waits).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from .cuda import Cuda, Event
from .store import ShardSpec, StateStore, Tensors, from_local, tensor_bytes, to_local

#: Byte alignment of each tensor in a group's buffer (a cache line; views of any dtype fit).
ALIGN = 64


@dataclass
class _Buffer:
    """One group's pinned host memory, and the copies into or out of it that may still run."""

    data: torch.Tensor
    events: list[Event] = field(default_factory=list)

    def wait(self) -> None:
        for event in self.events:
            event.synchronize()
        self.events.clear()


@dataclass
class _Entry:
    """A stored group: host tensors (buffer views, or CPU tensors kept as they are), the device
    each came from, and per device the event that ends its copy out."""

    host: Tensors
    devices: dict[str, torch.device]
    out: dict[torch.device, Event]


class HostStore(StateStore):
    """``offload="host"``: tensors live in CPU memory.

    On CUDA the host copies are views of one pinned buffer per group and both directions are
    non-blocking, on side streams (see the module's docstring). Tensors not on a CUDA device
    (all of them when training on a CPU, or Adam's CPU ``step`` counter) are kept as they are:
    host memory is their device.

    Args:
        cuda: The CUDA calls to make (tests pass a fake).
    """

    def __init__(self, *, cuda: Cuda | None = None) -> None:
        self._cuda = cuda if cuda is not None else Cuda()
        self._host: dict[int, _Entry] = {}
        # key -> (tensors on their devices, per device the event that ends the copy in, entry)
        self._ready: dict[int, tuple[Tensors, dict[torch.device, Event], _Entry]] = {}
        self._specs: dict[int, dict[str, ShardSpec]] = {}
        # key -> the group's buffer: kept while the group is on its device, for its next put
        self._buffers: dict[int, _Buffer] = {}
        self._finalizer = weakref.finalize(self, _release, self._buffers, self._cuda)
        # Not at interpreter exit: CUDA may be torn down by then, and the process frees it all.
        self._finalizer.atexit = False

    def put(self, key: int, tensors: Tensors) -> None:
        tensors, specs = to_local(tensors)
        on_cuda = {k: d for k, t in tensors.items() if (d := self._cuda.device(t)) is not None}
        out: dict[torch.device, Event] = {}
        views: Tensors = {}
        if on_cuda:
            # Before any change: a failed allocation leaves the store as it was.
            buffer = self._buffer(key, [tensors[k] for k in on_cuda])
            views = _views(buffer.data, {k: tensors[k] for k in on_cuda})
            for device in sorted(set(on_cuda.values()), key=str):
                stream = self._cuda.side_stream(device, "out")
                stream.wait_stream(self._cuda.current_stream(device))  # the step that wrote them
                for event in buffer.events:  # copies that may still read the buffer
                    stream.wait_event(event)
                for name, d in on_cuda.items():
                    if d == device:
                        self._cuda.copy_out(views[name], tensors[name], stream)
                out[device] = self._record(stream)
            # The copies out ran after every earlier event: waiting for them waits for all.
            buffer.events[:] = list(out.values())
        self._ready.pop(key, None)
        host = {k: views.get(k, t) for k, t in tensors.items()}
        devices = {k: on_cuda.get(k, t.device) for k, t in tensors.items()}
        self._host[key] = _Entry(host, devices, out)
        self._specs[key] = specs

    def prefetch(self, key: int) -> None:
        entry = self._host.get(key)
        if entry is None or not entry.out:
            return  # not here, already on its way back, or nothing to copy (CPU training)
        del self._host[key]
        moved = dict(entry.host)
        ready: dict[torch.device, Event] = {}
        for device, out_event in entry.out.items():
            stream = self._cuda.side_stream(device, "in")
            stream.wait_event(out_event)
            for name, d in entry.devices.items():
                if d == device:
                    moved[name] = self._cuda.copy_in(entry.host[name], device, stream)
            ready[device] = self._record(stream)
        self._buffers[key].events.extend(ready.values())
        self._ready[key] = (moved, ready, entry)

    def get(self, key: int) -> Tensors:
        if key in self._ready:
            moved, ready, entry = self._ready.pop(key)
            for device, event in ready.items():
                current = self._cuda.current_stream(device)
                current.wait_event(event)
                for name, d in entry.devices.items():
                    if d == device:
                        # Allocated on the copy-in stream, used on the compute stream from now on.
                        self._cuda.use_on(moved[name], current)
            return from_local(moved, self._specs.pop(key, {}))
        if key not in self._host:
            return from_local({}, self._specs.pop(key, {}))
        entry = self._host.pop(key)
        moved = dict(entry.host)
        copies: list[Event] = []
        for device, out_event in entry.out.items():
            current = self._cuda.current_stream(device)
            current.wait_event(out_event)
            for name, d in entry.devices.items():
                if d == device:
                    moved[name] = self._cuda.copy_in(entry.host[name], device, current)
            copies.append(self._record(current))
        if copies:
            self._buffers[key].events.extend(copies)
        return from_local(moved, self._specs.pop(key, {}))

    def peek(self, key: int) -> Tensors:
        """The stored tensors on the host: views of the group's buffer, valid (as PyTorch's own
        ``state_dict()`` values are) until the group is stepped and paged out again."""
        entry = self._ready[key][2] if key in self._ready else self._host.get(key)
        if entry is None:
            return {}
        for event in entry.out.values():  # every device's copy out, not only the current one's
            event.synchronize()
        return from_local(dict(entry.host), self._specs.get(key, {}))

    def flush(self) -> None:
        for entry in self._host.values():
            for event in entry.out.values():
                event.synchronize()
        for _, ready, _ in self._ready.values():
            for event in ready.values():
                event.synchronize()

    def __contains__(self, key: int) -> bool:
        return key in self._host or key in self._ready

    def resident_bytes(self) -> int:
        return sum(tensor_bytes(e.host) for e in self._host.values()) + sum(
            tensor_bytes(t) for t, _, _ in self._ready.values()
        )

    def pinned_bytes(self) -> int:
        """Bytes of pinned host memory this store holds (its groups' buffers), stored or not."""
        return sum(b.data.numel() for b in self._buffers.values())

    def close(self) -> None:
        """Waits for the copies in flight, then unpins and drops every buffer."""
        self._host.clear()
        self._ready.clear()
        self._finalizer()

    def _buffer(self, key: int, tensors: list[torch.Tensor]) -> _Buffer:
        # The group's buffer, made anew only if its tensors' sizes changed (the first steps of a
        # lazily initialised optimizer, a loaded checkpoint of another optimizer state).
        total = sum(_aligned(t) for t in tensors)
        buffer = self._buffers.get(key)
        if buffer is not None and buffer.data.numel() == total:
            return buffer
        if buffer is not None:
            buffer.wait()  # its last copies must have run before it is unpinned and freed
            self._cuda.unpin(buffer.data)
            del self._buffers[key]
        buffer = self._buffers[key] = _Buffer(self._cuda.pinned(total))
        return buffer

    def _record(self, stream: object) -> Event:
        event = self._cuda.event()
        event.record(stream)
        return event


def _aligned(t: torch.Tensor) -> int:
    return -(-t.numel() * t.element_size() // ALIGN) * ALIGN  # rounded up to ALIGN


def _views(data: torch.Tensor, tensors: Tensors) -> Tensors:
    # One view of ``data`` (uint8) per tensor, of its dtype and shape, in order, each aligned.
    views: Tensors = {}
    offset = 0
    for name, t in tensors.items():
        raw = data[offset : offset + t.numel() * t.element_size()]
        views[name] = raw.view(t.dtype).view(t.shape)
        offset += _aligned(t)
    return views


def _release(buffers: dict[int, _Buffer], cuda: Cuda) -> None:
    # close(), garbage collection or interpreter exit: no copy may still use a buffer we unpin.
    for buffer in buffers.values():
        buffer.wait()
        cuda.unpin(buffer.data)
    buffers.clear()
