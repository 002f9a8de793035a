"""Reading memory use: the accelerator's allocator on CUDA, the process's resident set on CPU."""

from __future__ import annotations

import os
import resource
import sys

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
