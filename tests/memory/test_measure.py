"""The one peak-memory meter: it sees an allocation that is already gone, and resets."""

from __future__ import annotations

import pytest
import torch

from hiftune.memory import measure
from hiftune.memory.measure import PeakMemory, current_memory_mib

SIZE_MIB = 64


def _touch() -> None:
    """Allocates and writes SIZE_MIB, then frees it (large blocks go back to the kernel)."""
    x = torch.ones(SIZE_MIB * 2**20 // 4)  # ones() writes every page: they become resident
    del x


def test_peak_sees_a_freed_allocation_and_resets() -> None:
    meter = PeakMemory("cpu")
    try:
        if not meter.method.startswith("VmHWM"):
            pytest.skip(f"no resettable high-water mark here ({meter.method})")
        meter.reset()
        before = current_memory_mib()
        _touch()
        assert meter.peak() >= before + 0.9 * SIZE_MIB
        assert meter.take_peak() >= before + 0.9 * SIZE_MIB  # the peak, then a reset
        assert meter.peak() < before + 0.5 * SIZE_MIB
    finally:
        meter.close()


def test_sampled_fallback_includes_the_current_size(monkeypatch: pytest.MonkeyPatch) -> None:
    # An interval longer than the test: the thread never samples, so the result is exact.
    monkeypatch.setattr(measure, "_clear_refs_works", lambda: False)
    meter = PeakMemory("cpu", interval=3600)
    try:
        assert meter.method.startswith("resident set size sampled")
        meter.reset()
        before = current_memory_mib()
        x = torch.ones(SIZE_MIB * 2**20 // 4)
        assert meter.peak() >= before + 0.9 * SIZE_MIB
        del x
        meter.reset()
        assert meter.peak() < before + 0.5 * SIZE_MIB
    finally:
        meter.close()
