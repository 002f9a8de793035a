"""A few held-out prompts answered by the base model and by the fine-tuned one (generation tasks).

A task is a generation task when its examples carry per-token ``labels`` (supervised fine-tuning,
language modelling); classification examples carry one class id and get no samples. The prompt
of an example is everything before its first supervised token (its reference answer is the
supervised tokens); an example supervised throughout (plain text) is cut in half. Answers are
greedy and short, so the samples cost seconds, not minutes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: Held-out prompts shown in the report.
SAMPLES = 3
#: Tokens generated per answer.
MAX_NEW_TOKENS = 32
#: The ``labels`` value of a token the loss ignores.
IGNORED = -100


@dataclass(frozen=True)
class Prompt:
    """One held-out prompt: its token ids and the reference answer's."""

    ids: list[int]
    reference: list[int]


def held_out_prompts(encoded: Sequence[Mapping[str, Any]], n: int = SAMPLES) -> list[Prompt]:
    """The prompts of the first ``n`` encoded examples; none for a classification task.

    Args:
        encoded: Encoded examples (``input_ids``, ``labels``) in data order.
        n: How many.
    """
    out = []
    for example in encoded[:n]:
        ids, labels = list(example["input_ids"]), example["labels"]
        if not isinstance(labels, (list, tuple)):
            return []  # one class id per example: not a generation task
        first = next((i for i, label in enumerate(labels) if label != IGNORED), len(ids))
        if first == 0:  # supervised throughout: continue its first half
            first = max(1, len(ids) // 2)
        supervised = zip(ids[first:], labels[first:], strict=True)
        reference = [t for t, label in supervised if label != IGNORED]
        out.append(Prompt(ids[:first], reference))
    return out


def generate(
    model: Any, tokenizer: Any, prompts: Sequence[Prompt], max_new_tokens: int = MAX_NEW_TOKENS
) -> list[str]:
    """Greedy answers of ``model`` to ``prompts`` (one at a time: no padding to get wrong).

    The model's training mode is restored afterwards.
    """
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    greedy = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    was_training = model.training
    model.eval()
    answers = []
    try:
        with torch.no_grad():
            for prompt in prompts:
                ids = torch.tensor([prompt.ids], device=device)
                out = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=greedy
                )
                answers.append(decode(tokenizer, out[0, ids.shape[1] :].tolist()))
    finally:
        model.train(was_training)
    return answers


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Token ids as text, without special tokens."""
    text: str = tokenizer.decode(list(ids), skip_special_tokens=True)
    return text.strip()


def samples_record(
    tokenizer: Any, prompts: Sequence[Prompt], answers: Sequence[str] | None
) -> list[dict[str, str | None]]:
    """The report's samples: prompt, reference answer and the base model's answer (if known)."""
    return [
        {
            "prompt": decode(tokenizer, p.ids),
            "reference": decode(tokenizer, p.reference),
            "base": answers[i] if answers is not None else None,
        }
        for i, p in enumerate(prompts)
    ]
