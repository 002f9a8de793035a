"""Reading memory use: the accelerator's allocator on CUDA, the process's resident set on CPU.

:class:`PeakMemory` is the one way hiftune measures the peak of a stretch of work (a profiled step,
a logged training interval); the functions below it read single values.
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


def reset_peak_memory(device: torch.device | str = "cpu") -> None:
    """Resets the CUDA peak counter (the CPU peak cannot be reset: measure in a fresh process)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class PeakMemory:
    """The peak memory of a stretch of work, resettable: exact on CUDA and Linux, sampled elsewhere.

    On CUDA it reads ``torch.cuda.max_memory_allocated``. On Linux it resets the kernel's
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
