"""The CUDA calls of paging, in one place: copy streams, events, copies, pinned host buffers.

The stores call CUDA only through a :class:`Cuda` object, so that tests can hand them a fake that
runs the copies on a CPU in stream order (and only when an event or a stream wait says so), which
makes a missing wait show as wrong data without a GPU.

Host buffers are pinned with ``cudaHostRegister`` on plain host memory rather than allocated by
PyTorch's caching host allocator, which rounds each block up to a power of two and keeps freed
blocks for good: a buffer here takes its own size, and :meth:`Cuda.unpin` gives it back.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)


class Stream(Protocol):
    """What paging uses of a ``torch.cuda.Stream``."""

    def wait_stream(self, stream: Any) -> None: ...

    def wait_event(self, event: Any) -> None: ...


class Event(Protocol):
    """What paging uses of a ``torch.cuda.Event``."""

    def record(self, stream: Any = None) -> None: ...

    def synchronize(self) -> None: ...


class Cuda:
    """The CUDA operations the stores make (a fake may stand in for it in tests).

    Side streams are made once per device and role (``"out"`` for copies to the host, ``"in"``
    for copies back), so the two directions can run at once on the two copy engines.
    """

    def __init__(self) -> None:
        self._streams: dict[tuple[torch.device, str], Any] = {}

    def device(self, t: torch.Tensor) -> torch.device | None:
        """The CUDA device of ``t``, or ``None`` for a tensor elsewhere (it stays in place)."""
        return t.device if t.device.type == "cuda" else None

    def current_stream(self, device: torch.device) -> Stream:
        """The stream computing on ``device`` now."""
        return torch.cuda.current_stream(device)

    def side_stream(self, device: torch.device, role: str) -> Stream:
        """This store's stream for ``role`` copies on ``device``."""
        key = (device, role)
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device=device)
        return self._streams[key]

    def event(self) -> Event:
        """A new event (recorded later, on one stream)."""
        return torch.cuda.Event()

    def copy_out(self, dst: torch.Tensor, src: torch.Tensor, stream: Stream) -> None:
        """Queues the copy of device tensor ``src`` into host tensor ``dst`` on ``stream``.

        ``src``'s memory is not reused by its allocator before the copy has run.
        """
        with torch.cuda.stream(stream):  # type: ignore[arg-type]
            dst.copy_(src, non_blocking=True)
        src.record_stream(stream)  # type: ignore[arg-type]

    def copy_in(self, src: torch.Tensor, device: torch.device, stream: Stream) -> torch.Tensor:
        """Queues the copy of host tensor ``src`` to ``device`` on ``stream``; returns the copy."""
        with torch.cuda.stream(stream):  # type: ignore[arg-type]
            return src.to(device, non_blocking=True)

    def use_on(self, t: torch.Tensor, stream: Stream) -> None:
        """Marks ``t`` (made on another stream) as used on ``stream`` from now on."""
        t.record_stream(stream)  # type: ignore[arg-type]

    def pinned(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of page-locked host memory (``uint8``), or plain memory if pinning fails."""
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes == 0:
            return buffer  # nothing to pin (a group of empty tensors)
        error = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0)
        if int(error) != 0:
            # Copies from plain memory are correct, only synchronous: slower, never wrong.
            logger.warning(
                "could not pin %d bytes of host memory for paged state (CUDA error %s); "
                "copies to and from it will not overlap computation",
                nbytes,
                int(error),
            )
        return buffer

    def unpin(self, buffer: torch.Tensor) -> None:
        """Unpins a :meth:`pinned` buffer (no copy may use it any more). Tensors that still view
        it stay valid, as plain memory."""
        if buffer.is_pinned():
            torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
