"""Reading memory use: the accelerator's allocator on CUDA, the process's resident set on CPU.

:class:`PeakMemory` is the one way hiftune measures the peak of a stretch of work (a profiled step,
a logged training interval); the functions below it read single values.

On CUDA three figures matter, and the peak hiftune reports is the first: memory *allocated* to
tensors (``max_memory_allocated``); memory *reserved* by PyTorch's caching allocator (allocated
plus its cache and fragmentation: what the device really lacks, and what an out-of-memory error
is about); and *pinned* host memory (page-locked RAM, which the operating system cannot swap
out). PyTorch's caching host allocator reports what ``pin_memory()`` took; the host store pins its
buffers itself (``cudaHostRegister``) and reports them by ``pinned_bytes()``, so a figure of
pinned memory adds the two (:mod:`.profile_worker` does).
"""

from __future__ import annotations

import os
import resource
import sys
import threading

import torch

MiB = 2**20


def current_memory_mib(device: torch.device | str = "cpu") -> float:
    """Memory in use now: allocated CUDA memory, or this process's resident set size on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MiB
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / MiB
    except OSError:  # not Linux: fall back to the peak, the best the platform offers
        return peak_memory_mib(device)


def peak_memory_mib(device: torch.device | str = "cpu") -> float:
    """Peak memory so far: ``max_memory_allocated`` on CUDA, peak resident set size on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MiB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / MiB if sys.platform == "darwin" else rss / 1024


def peak_reserved_mib(device: torch.device | str = "cpu") -> float | None:
    """Peak memory reserved by the CUDA caching allocator so far; ``None`` off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_reserved(device) / MiB


def pinned_memory_mib(peak: bool = False) -> float | None:
    """Pinned host memory held by PyTorch's caching host allocator (in use and cached), now or
    at its peak, MiB; ``None`` without CUDA or where torch has no host statistics. Memory pinned
    with ``cudaHostRegister`` (the host store's buffers) is not the allocator's: not counted."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None or not torch.cuda.is_initialized():
        return None
    values = stats()
    which = "peak" if peak else "current"
    # Older torch documents the allocator's pool as "reserved_bytes" (and "allocated_bytes" as
    # the part in use), newer torch as "allocated_bytes" ("active_bytes" in use): the larger.
    held = (values.get(f"{k}.{which}", 0) for k in ("reserved_bytes", "allocated_bytes"))
    return max(held) / MiB


def reset_peak_memory(device: torch.device | str = "cpu") -> None:
    """Resets the CUDA peak counters, pinned host memory's too (the CPU peak cannot be reset:
    measure in a fresh process)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        if hasattr(torch.cuda, "reset_peak_host_memory_stats") and torch.cuda.is_initialized():
            torch.cuda.reset_peak_host_memory_stats()


class PeakMemory:
    """The peak memory of a stretch of work, resettable: exact on CUDA and Linux, sampled elsewhere.

    On CUDA it reads ``torch.cuda.max_memory_allocated``, and :meth:`peak_reserved` and
    :meth:`peak_pinned` the caching allocator's peak reservation and pinned host memory over the
    same stretch. On Linux it resets the kernel's
    high-water mark of the resident set (``/proc/self/clear_refs``) and reads ``VmHWM``, which sees
    even a peak that lasts a microsecond. Where neither works it samples the resident set size on
    a background thread every ``interval`` seconds (:attr:`method` says which one is in use).

    Args:
        device: The device whose memory to follow.
        interval: Sampling period of the fallback thread, seconds.
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.001) -> None:
        self._device = torch.device(device)
        self._sampled = 0.0
        self._stop: threading.Event | None = None
        if self._device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
        elif _clear_refs_works():
            self.method = "VmHWM after /proc/self/clear_refs"
        else:
            self.method = f"resident set size sampled every {interval * 1000:g} ms"
            self._sampled = current_memory_mib()
            self._stop = threading.Event()
            threading.Thread(
                target=self._sample, args=(interval,), daemon=True, name="hiftune-memory"
            ).start()

    def reset(self) -> None:
        """Starts a new stretch: the next :meth:`peak` counts from now."""
        if self._device.type == "cuda":
            reset_peak_memory(self._device)
        elif self._stop is None:
            _clear_refs()
        else:
            self._sampled = current_memory_mib()

    def peak(self) -> float:
        """The peak since the last :meth:`reset` (or since construction), MiB."""
        if self._device.type == "cuda":
            return peak_memory_mib(self._device)
        if self._stop is None:
            return _vm_hwm_mib()
        return max(self._sampled, current_memory_mib())

    def peak_reserved(self) -> float | None:
        """The CUDA caching allocator's peak reservation since the last reset, MiB (``None`` off
        CUDA): the peak plus the allocator's cache and fragmentation."""
        return peak_reserved_mib(self._device)

    def peak_pinned(self) -> float | None:
        """Peak pinned host memory of PyTorch's caching host allocator since the last reset,
        MiB (``None`` off CUDA; see :func:`pinned_memory_mib`)."""
        return pinned_memory_mib(peak=True) if self._device.type == "cuda" else None

    def take_peak(self) -> float:
        """The peak since the last reset, then resets: one call per logged interval."""
        peak = self.peak()
        self.reset()
        return peak

    def close(self) -> None:
        """Stops the sampling thread, if there is one."""
        if self._stop is not None:
            self._stop.set()

    def _sample(self, interval: float) -> None:
        stop = self._stop
        while stop is not None and not stop.wait(interval):
            self._sampled = max(self._sampled, current_memory_mib())


def _clear_refs() -> None:
    # Writing 5 resets the peak resident set size (VmHWM) to the current one (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _clear_refs_works() -> bool:
    try:
        _clear_refs()
        return _vm_hwm_mib() > 0
    except OSError:
        return False


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return 0.0
