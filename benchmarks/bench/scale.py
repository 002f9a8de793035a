"""Predicted memory at 7B/8B scale: each method's own formula next to hiftune's estimator.

Every figure is weights + gradients + optimizer state, in GiB, before activations (the same scope
as ``hiftune estimate``), computed from the parameter shapes of the architecture built on the
``meta`` device. Full fine-tuning and hiftune come from :func:`hiftune.memory.estimate.estimate`;
every other row from the formula named in its ``source``, applied as the benchmarked
configuration trains (bf16 weights for the methods that train a bf16 model).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from hiftune.memory.configs import build_model, resolve_config
from hiftune.memory.estimate import estimate

GiB = 2**30

MODELS = ("llama-2-7b", "llama-3.1-8b")


def meta_model(name: str) -> nn.Module:
    """The architecture on the ``meta`` device (shapes only, no memory)."""
    return build_model(resolve_config(name), "causal-lm", device="meta")


def _lowrank(name: str, p: nn.Parameter) -> bool:
    # The matrices GaLore/APOLLO project: 2-D attention and MLP weights (bench.adapters.galore).
    return p.dim() == 2 and ("attn" in name or "mlp" in name)


def _blocks(named: dict[str, nn.Parameter]) -> dict[str, int]:
    """Parameter count per BAdam block: ``model.layers.N`` (plus ``embed`` / ``rest``)."""
    out: dict[str, int] = {}
    for n, p in named.items():
        parts = n.split(".")
        key = ".".join(parts[:3]) if "layers" in parts else ("embed" if "embed" in n else "rest")
        out[key] = out.get(key, 0) + p.numel()
    return out


def formulas(model: nn.Module) -> list[dict[str, Any]]:
    """One row per method: GiB and the source of the formula."""
    named = dict(model.named_parameters())
    total = sum(p.numel() for p in named.values())
    largest = max(p.numel() for p in named.values())
    blocks = _blocks(named)
    layer_max = max(v for k, v in blocks.items() if "layers" in k)
    all_max = max(blocks.values())
    linears = [
        p for n, p in named.items() if p.dim() == 2 and "embed" not in n and "lm_head" not in n
    ]

    def lora(r: int) -> float:
        extra = sum(r * (p.shape[0] + p.shape[1]) for p in linears)
        # bf16 frozen base; fp32 adapters with fp32 grads and two fp32 Adam moments.
        return 2 * total + 16 * extra

    def lowrank(r: int, projector: bool) -> float:
        # bf16 weights and full bf16 gradients; Adam moments (bf16, like the gradients) of the
        # projected r x n gradient for projected matrices, full size for the rest; GaLore also
        # keeps its m x r projection matrix, APOLLO regenerates its random one from a seed.
        state = 0
        for n, p in named.items():
            if _lowrank(n, p):
                m, k = sorted(p.shape)
                state += 2 * r * k + (m * r if projector else 0)
            else:
                state += 2 * p.numel()
        return 2 * total + 2 * total + 2 * state

    def badam(block: int) -> float:
        # bf16 weights; the active block: bf16 grad, fp32 copy, fp32 grad, two fp32 moments.
        return 2 * total + (2 + 4 + 4 + 8) * block

    rows = [
        ("LoRA r8 (bf16 base)", lora(8), "Hu et al. 2021: r(d_in+d_out) per adapted linear"),
        ("LoRA r64 (bf16 base)", lora(64), "Hu et al. 2021: r(d_in+d_out) per adapted linear"),
        ("BAdam, defaults", badam(layer_max), "badam block_optim.py: fp32 copy of one block"),
        ("BAdam + embedding + head", badam(all_max), "badam block_optim.py, largest block"),
        (
            "LOMO",
            2 * total + (2 + 4 + 4) * largest,
            "Lv et al. 2023 / lomo_optim: bf16 weights, one gradient at a time",
        ),
        ("GaLore r128", lowrank(128, True), "Zhao et al. 2024, Table 1: mr + 2nr per matrix"),
        ("APOLLO r256", lowrank(256, False), "Zhu et al. 2025: 2nr per matrix, seeded projector"),
        ("APOLLO-Mini r1", lowrank(1, False), "Zhu et al. 2025: rank-1 states"),
        ("Adam-mini", 2 * total + 2 * total + 2 * total, "Zhang et al. 2024: m only, v per block"),
        ("8-bit AdamW", 2 * total + 2 * total + 2 * total, "Dettmers et al. 2022: 1 byte/moment"),
    ]
    return [{"method": m, "gib": b / GiB, "source": s} for m, b, s in rows]


def hiftune_rows(model: nn.Module) -> list[dict[str, Any]]:
    """Full fine-tuning and HiFT (AdamW, m = 1) from hiftune's own estimator."""
    label = {
        ("fpft", "fp32"): "full FT, AdamW fp32",
        ("fpft", "mixed"): "full FT, AdamW bf16 mixed (fp32 masters)",
        ("hift", "fp32"): "hiftune fp32",
        ("hift", "mixed^Hi"): "hiftune bf16 mixed^Hi",
    }
    out = []
    for row in estimate(model, optimizers=["adamw"], precisions=["fp32", "bf16"]):
        key = (row.method, row.mode)
        if key in label:
            out.append({"method": label[key], "gib": row.total_gib, "source": "hiftune estimate"})
    return out


def predict() -> dict[str, Any]:
    """Every row for every model of :data:`MODELS`."""
    out: dict[str, Any] = {}
    for name in MODELS:
        model = meta_model(name)
        params = sum(p.numel() for p in dict(model.named_parameters()).values())
        out[name] = {"params": params, "rows": hiftune_rows(model) + formulas(model)}
    return out
