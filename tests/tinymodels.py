"""Tiny models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """A pre-norm MLP block: enough structure for the unit walk and for autograd checks."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ff(self.norm(x))


class TinyLM(nn.Module):
    """A plain custom stack: embedding (+ positions), blocks, final norm and head."""

    def __init__(self, vocab: int = 32, d: int = 16, layers: int = 4, tie: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(64, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a TinyLM."""
    logits = model(ids)
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_steps(model: nn.Module, opt, batches, sched=None) -> list[float]:
    """One optimizer step (and scheduler step, if given) per batch; returns the losses."""
    losses = []
    for ids in batches:
        loss = lm_loss(model, ids)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def tiny_hf_config(family: str):
    """A 2-3 layer, hidden-16 ``transformers`` config of ``family``."""
    import transformers as T

    common = dict(vocab_size=64)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[family]
        return cls(
            **common,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        )
    if family == "gpt2":
        return T.GPT2Config(
            **common, n_embd=16, n_layer=3, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
        )
    if family == "gpt_neo":
        return T.GPTNeoConfig(
            **common,
            hidden_size=16,
            num_layers=3,
            num_heads=2,
            attention_types=[[["global", "local"], 1], [["global"], 1]],
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=0,
        )
    if family == "opt":
        return T.OPTConfig(
            **common,
            hidden_size=16,
            ffn_dim=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            max_position_embeddings=32,
            word_embed_proj_dim=8,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        )
    if family == "bert":
        return T.BertConfig(
            **common,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            max_position_embeddings=32,
        )
    if family == "roberta":
        return T.RobertaConfig(
            **common,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            max_position_embeddings=40,
        )
    raise KeyError(family)
