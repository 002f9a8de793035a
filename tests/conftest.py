"""Shared fixtures and the ``gpu`` marker's skip; the tiny models live in ``tinymodels.py``."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tinymodels import TinyLM


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips ``@pytest.mark.gpu`` tests on a machine without CUDA (they run wherever it exists)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def tiny_lm() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


@pytest.fixture
def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 32, (4, 12), generator=g) for _ in range(16)]
