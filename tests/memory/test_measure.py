"""The one peak-memory meter: it sees an allocation that is already gone, and resets."""

from __future__ import annotations

import pytest
import torch

from hiftune.memory import measure
from hiftune.memory.measure import MiB, PeakMemory, current_memory_mib

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


@pytest.mark.parametrize(
    "stats",
    [
        # newer torch: "allocated_bytes" is the pinned pool, "active_bytes" the part in use
        {"allocated_bytes.current": 48 * MiB, "active_bytes.current": 8 * MiB,
         "allocated_bytes.peak": 64 * MiB, "active_bytes.peak": 16 * MiB},
        # older torch: "reserved_bytes" is the pool, "allocated_bytes" the part in use
        {"reserved_bytes.current": 48 * MiB, "allocated_bytes.current": 8 * MiB,
         "reserved_bytes.peak": 64 * MiB, "allocated_bytes.peak": 16 * MiB},
    ],
)  # fmt: skip
def test_pinned_memory_is_the_host_allocators_whole_pool(
    monkeypatch: pytest.MonkeyPatch, stats: dict[str, int]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "host_memory_stats", lambda: stats)
    assert measure.pinned_memory_mib() == 48
    assert measure.pinned_memory_mib(peak=True) == 64


def test_reserved_and_pinned_memory_are_cuda_figures() -> None:
    meter = PeakMemory("cpu")
    try:
        assert meter.peak_reserved() is None and meter.peak_pinned() is None
    finally:
        meter.close()


@pytest.mark.gpu
def test_cuda_meter_reads_allocated_reserved_and_pinned_peaks() -> None:
    meter = PeakMemory("cuda")
    torch.cuda.synchronize()
    meter.reset()
    x = torch.empty(SIZE_MIB * MiB, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(SIZE_MIB * MiB, dtype=torch.uint8, pin_memory=True)
    del x
    peak, reserved, pinned_peak = meter.peak(), meter.peak_reserved(), meter.peak_pinned()
    assert peak >= SIZE_MIB and reserved is not None and reserved >= peak
    assert pinned_peak is not None and pinned_peak >= SIZE_MIB
    del pinned
