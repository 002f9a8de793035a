"""Model architectures by name, for the memory tools: presets, or a Hugging Face ``config.json``.

The memory tools never need weights: ``estimate`` builds the model on the ``meta`` device and
``profile`` with random weights. A preset is a ``transformers`` config written down as data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Preset name -> ``transformers.AutoConfig.for_model`` arguments (public architecture facts).
CONFIGS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    "llama-2-13b": dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "roberta-base": dict(
        model_type="roberta",
        vocab_size=50265,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=1,
    ),
    "gpt2": dict(
        model_type="gpt2",
        vocab_size=50257,
        n_embd=768,
        n_layer=12,
        n_head=12,
        n_positions=1024,
    ),
}

HEADS = ("causal-lm", "seq-cls")


def resolve_config(model: str) -> Any:
    """A ``transformers`` config from a preset name, a ``config.json`` file, or a model directory.

    Raises:
        ValueError: If ``model`` is neither a preset nor an existing config file or directory.
    """
    from transformers import AutoConfig

    if model in CONFIGS:
        kwargs = dict(CONFIGS[model])
        return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"{model!r} is neither a preset ({', '.join(CONFIGS)}) nor a config.json file or a "
            "directory holding one"
        )
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read a Hugging Face config from {path}: {e}") from None


def build_model(
    config: Any,
    task: str = "causal-lm",
    num_labels: int = 2,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Builds a randomly initialised model for ``task`` on ``device`` (``"meta"``: no memory).

    Raises:
        ValueError: For an unknown task, or an architecture that cannot do it.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task not in HEADS:
        raise ValueError(f"task must be one of {', '.join(HEADS)}; got {task!r}")
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    if task == "seq-cls":
        config.num_labels = num_labels
    try:
        with torch.device(device):
            return auto.from_config(config, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"a {config.model_type} model cannot do {task}: {e}") from None
