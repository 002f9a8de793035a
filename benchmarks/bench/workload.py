"""The memory/speed workload: a randomly initialised model and random token batches.

Memory and step time do not depend on the weights' values, so the architecture is built from its
config (``hiftune.memory.configs``) with random weights, directly in the precision the method
trains in (no fp32 copy is ever made for a bf16 method), and trained as a causal LM on uniformly
random tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hiftune.memory.configs import build_model, resolve_config

#: A 2-block llama for the harness's own tests (same parameter names as SmolLM2).
TINY = "tiny-llama"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def import_model_code(name: str) -> type:
    """Imports the model's ``transformers`` class (and returns it) without building a model.

    The worker reads each method's *runtime* memory after this, so that the figure covers the
    same code for every method, whether or not its own package imports ``transformers``.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config(name))]


def model_config(name: str) -> Any:
    """The ``transformers`` config of a preset in ``hiftune.memory.configs.CONFIGS``, or the tiny
    test model."""
    if name == TINY:
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        )
    return resolve_config(name)


def make_model(name: str, dtype: str, seed: int = 0) -> nn.Module:
    """A randomly initialised causal LM of architecture ``name`` with weights in ``dtype``."""
    torch.manual_seed(seed)
    return build_model(model_config(name), "causal-lm", dtype=DTYPES[dtype])


def random_batches(
    vocab: int, batch: int, seq_len: int, n: int, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of uniformly random tokens; the labels are the inputs (causal LM loss)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own causal-LM loss."""
    return model(**batch).loss
