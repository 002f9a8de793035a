"""``offload="host"``: the state of inactive groups in host memory."""

from __future__ import annotations

import torch

from .store import ShardSpec, StateStore, Tensors, from_local, tensor_bytes, to_local


class HostStore(StateStore):
    """``offload="host"``: tensors live in CPU memory.

    On CUDA the host copies are pinned and both directions are non-blocking: the copy out is
    queued on the current stream, and a prefetch copies back on a side stream that the compute
    stream waits for only when the step needs the tensors. On a CPU device this store keeps the
    tensors as they are (host memory is the device).
    """

    def __init__(self) -> None:
        # key -> (host tensors, device each came from, event marking the end of the copy out)
        self._host: dict[int, tuple[Tensors, dict[str, torch.device], torch.cuda.Event | None]] = {}
        self._ready: dict[int, tuple[Tensors, torch.cuda.Event]] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._specs: dict[int, dict[str, ShardSpec]] = {}

    def put(self, key: int, tensors: Tensors) -> None:
        tensors, self._specs[key] = to_local(tensors)
        out: Tensors = {}
        devices: dict[str, torch.device] = {}
        event = None
        for name, t in tensors.items():
            devices[name] = t.device
            if t.device.type == "cuda":
                host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
                host.copy_(t, non_blocking=True)
                out[name] = host
            else:
                out[name] = t
        if any(d.type == "cuda" for d in devices.values()):
            event = torch.cuda.Event()
            event.record()
        self._host[key] = (out, devices, event)

    def prefetch(self, key: int) -> None:
        if key not in self._host or key in self._ready:
            return
        host, devices, out_event = self._host[key]
        cuda = {d for d in devices.values() if d.type == "cuda"}
        if len(cuda) != 1:
            return  # nothing to copy (CPU training), or a group spread over several GPUs
        (device,) = cuda
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        stream = self._streams[device]
        del self._host[key]
        with torch.cuda.stream(stream):
            if out_event is not None:
                stream.wait_event(out_event)
            moved = {k: v.to(devices[k], non_blocking=True) for k, v in host.items()}
            in_event = torch.cuda.Event()
            in_event.record(stream)
        self._ready[key] = (moved, in_event)

    def get(self, key: int) -> Tensors:
        if key in self._ready:
            moved, in_event = self._ready.pop(key)
            for t in moved.values():
                if t.device.type == "cuda":
                    current = torch.cuda.current_stream(t.device)
                    current.wait_event(in_event)
                    # Allocated on the side stream, used on the compute stream from now on.
                    t.record_stream(current)
            return from_local(moved, self._specs.pop(key, {}))
        host, devices, _ = self._host.pop(key, ({}, {}, None))
        # Same stream as the copy out, so stream order makes this safe without a sync.
        moved = {k: v.to(devices[k], non_blocking=True) for k, v in host.items()}
        return from_local(moved, self._specs.pop(key, {}))

    def peek(self, key: int) -> Tensors:
        if key in self._ready:
            self._ready[key][1].synchronize()
            local = {k: v.to("cpu") for k, v in self._ready[key][0].items()}
            return from_local(local, self._specs.get(key, {}))
        host, _, event = self._host.get(key, ({}, {}, None))
        if event is not None:
            event.synchronize()
        return from_local(dict(host), self._specs.get(key, {}))

    def flush(self) -> None:
        for _, _, event in self._host.values():
            if event is not None:
                event.synchronize()
        for _, event in self._ready.values():
            event.synchronize()

    def __contains__(self, key: int) -> bool:
        return key in self._host or key in self._ready

    def resident_bytes(self) -> int:
        return sum(tensor_bytes(h) for h, _, _ in self._host.values()) + sum(
            tensor_bytes(t) for t, _ in self._ready.values()
        )
