"""The architecture presets of the memory tools against their published parameter counts."""

from __future__ import annotations

import pytest

from hiftune.memory.configs import CONFIGS, build_model, resolve_config

# Total parameters in billions, as published (Qwen2.5-7B's model card: 7.61B; the Gemma 2 report:
# 2.61B for the 2B model; Llama 2 paper / Llama 3.1 card figures as commonly quoted: 6.74B, 8.03B).
# The tolerance covers the publishers' rounding or truncation to two decimals.
PUBLISHED = {
    "llama-2-7b": 6.74,
    "llama-3.1-8b": 8.03,
    "qwen2.5-7b": 7.61,
    "gemma-2-2b": 2.61,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_has_the_published_size(name: str) -> None:
    model = build_model(resolve_config(name), device="meta")
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions == pytest.approx(PUBLISHED[name], abs=0.006)


def test_every_preset_builds_on_meta() -> None:
    for name in CONFIGS:
        model = build_model(resolve_config(name), device="meta")
        assert all(p.is_meta for p in model.parameters())
