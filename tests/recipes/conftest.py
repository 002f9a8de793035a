"""Tiny models and data files for the recipe tests, all built in code (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

WORDS = [
    "a",
    "the",
    "movie",
    "film",
    "was",
    "it",
    "is",
    "this",
    "great",
    "terrible",
    "good",
    "bad",
    "fun",
    "dull",
    "boring",
    "lovely",
    "awful",
    "story",
    "acting",
    "plot",
    "not",
    "very",
    "and",
    "of",
    "review",
    "positive",
    "negative",
    "sentiment",
    "answer",
    "with",
    "one",
    "word",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def make_tokenizer(path: Path | None = None):
    """A word-level tokenizer over :data:`WORDS` with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate([*specials, *WORDS, ":", "assistant", "user", "."])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    fast.chat_template = CHAT_TEMPLATE
    if path is not None:
        fast.save_pretrained(path)
    return fast


def make_llama(path: Path, tok: Any = None, **config_overrides: Any) -> Path:
    """A 2-block llama causal LM (tied embeddings unless overridden), saved with its tokenizer.

    Args:
        path: Where to save it.
        tok: Its tokenizer (default :func:`make_tokenizer`).
        **config_overrides: ``LlamaConfig`` fields to change.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tok if tok is not None else make_tokenizer()
    torch.manual_seed(0)
    fields = dict(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config = LlamaConfig(**{**fields, **config_overrides})
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_bert(path: Path) -> Path:
    """A 2-block bert encoder (no LM head, like all-MiniLM), saved with its tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    tok = make_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def word_tokenizer():
    """The word-level tokenizer of the tiny models (see :func:`make_tokenizer`)."""
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`tiny_llama` with 8 blocks: 10 units as a sequence classifier whose new ``score``
    head is always active (embed, layers.0-7, the final norm)."""
    return make_llama(tmp_path_factory.mktemp("tiny-llama8"), num_hidden_layers=8)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bert(tmp_path_factory.mktemp("tiny-bert"))


def sentiment_records(n: int = 40) -> list[dict]:
    good = ["a great movie", "lovely acting", "the story is fun", "a good film", "great plot"]
    bad = ["a terrible movie", "dull acting", "the story is boring", "a bad film", "awful plot"]
    out = []
    for i in range(n):
        pool, label = (good, "positive") if i % 2 else (bad, "negative")
        out.append({"sentence": pool[i % len(pool)], "sentiment": label})
    return out


@pytest.fixture
def cls_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "cls.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sentiment_records()))
    return path


@pytest.fixture
def sft_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "sft.jsonl"
    rows = [
        {"question": f"review : {r['sentence']}", "answer": r["sentiment"]}
        for r in sentiment_records(20)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test's own ``datasets`` cache (local files are prepared into it)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
