"""Held-out prompts of ``sft``, answered by the base model and by the fine-tuned one.

The first rows of the evaluation split become prompts (:func:`held_out_prompts`): what comes
before a conversation's last answer, in the chat template with its generation prompt (or a
pair's prompt), with the data's answer as the reference. :class:`HeldOut` has them answered
before training (with the zero-shot evaluation) and after it, greedily, in batches and with a
progress bar; the answers' exact match and ROUGE-L (:mod:`.generation`) join the evaluation
metrics, so the report shows whether the model learned to answer. The first few are the report's
samples: the user's question as written (not the system prompt or template text around it), the
reference and both answers. A plain-text row is continued from its middle: a sample, not scored.

Generation is kept cheap: :data:`PROMPTS` prompts, as many new tokens as the longest reference
has (within :data:`MIN_NEW_TOKENS` and :data:`MAX_NEW_TOKENS`), seconds rather than minutes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import chat
from .generation import EXACT_MATCH, ROUGE_L, generation_metrics

logger = logging.getLogger(__name__)

#: Held-out prompts answered and scored before and after training.
PROMPTS = 32
#: Of them, the first ones the report shows.
SAMPLES = 3
#: Bounds of the tokens generated per answer (the longest reference's, plus one).
MIN_NEW_TOKENS, MAX_NEW_TOKENS = 16, 64


@dataclass(frozen=True)
class Prompt:
    """One held-out prompt.

    Attributes:
        ids: Its tokens, as the model is given them.
        question: What the report shows: the user's last turn or the pair's prompt, as written.
        reference: The data's answer.
        scored: Whether answers are scored against ``reference`` (not for a text continuation).
    """

    ids: list[int]
    question: str
    reference: str
    scored: bool = True


def prompt_of(row: Mapping[str, Any], tokenizer: Any) -> Prompt | None:
    """A row of :func:`.chat.normalize_rows` as a prompt to answer; ``None`` if it has none.

    For a conversation: everything before its last assistant turn, rendered with the generation
    prompt, and that turn's content; for a pair: its prompt (in the chat template if the
    tokenizer has one, else its text as training tokenizes it) and its completion; for plain
    text: its first half, continued by its second.
    """
    if "text" in row:
        ids = list(tokenizer(row["text"])["input_ids"])
        half = max(1, len(ids) // 2)
        return Prompt(
            ids[:half], decode(tokenizer, ids[:half]), decode(tokenizer, ids[half:]), False
        )
    if "messages" in row:
        messages = list(row["messages"])
    elif getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]},
        ]
    else:  # a base model: the prompt's text, as encode_sft tokenizes it
        ids = list(tokenizer(row["prompt"])["input_ids"])
        return Prompt(ids, row["prompt"], row["completion"])
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    reference = messages[last].get("content")
    if last == 0 or not isinstance(reference, str):  # nothing asked, or a tool call answered
        return None
    before = messages[:last]
    asked = next((m for m in reversed(before) if m["role"] not in ("system", "developer")), None)
    text = chat.render(tokenizer, before, generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template wrote them
    question = str((asked or before[-1]).get("content") or "")
    return Prompt(ids, question, reference)


def held_out_prompts(
    rows: Sequence[Mapping[str, Any]], tokenizer: Any, max_length: int, n: int = PROMPTS
) -> list[Prompt]:
    """The prompts of the first ``n`` rows that have one within ``max_length`` tokens.

    A prompt that fills ``max_length`` is skipped: training cuts such an example before its
    answer, so the model never learns to answer it.
    """
    out = []
    for row in rows:
        prompt = prompt_of(row, tokenizer)
        if prompt is not None and len(prompt.ids) < max_length:
            out.append(prompt)
            if len(out) == n:
                break
    return out


def new_tokens(tokenizer: Any, prompts: Sequence[Prompt]) -> int:
    """Tokens to generate per answer: the longest reference's plus one (the end of the answer),
    within :data:`MIN_NEW_TOKENS` and :data:`MAX_NEW_TOKENS`."""
    longest = max(
        (len(tokenizer(p.reference, add_special_tokens=False)["input_ids"]) for p in prompts),
        default=0,
    )
    return min(MAX_NEW_TOKENS, max(MIN_NEW_TOKENS, longest + 1))


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    max_new_tokens: int = MIN_NEW_TOKENS,
    batch_size: int = 8,
    desc: str = "generate",
) -> list[str]:
    """Greedy answers of ``model`` to ``prompts``, in batches, with a progress bar.

    Prompts of similar length are batched together and padded on the left (where a causal LM
    continues from the right); the answers come back in the prompts' order. The model's
    training mode is restored afterwards.
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    greedy = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad
    )
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))
    answers = [""] * len(prompts)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False)
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                width = max(len(prompts[i].ids) for i in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, i in enumerate(batch):
                    n = len(prompts[i].ids)
                    ids[row, width - n :] = torch.tensor(prompts[i].ids)
                    mask[row, width - n :] = 1
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=greedy,
                )
                for row, i in enumerate(batch):
                    answers[i] = decode(tokenizer, out[row, width:].tolist())
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return answers


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Token ids as text, without special tokens."""
    text: str = tokenizer.decode(list(ids), skip_special_tokens=True)
    return text.strip()


def samples_record(
    prompts: Sequence[Prompt], answers: Sequence[str] | None
) -> list[dict[str, str | None]]:
    """The report's samples: question, reference answer and the base model's answer (if known)."""
    return [
        {
            "prompt": p.question,
            "reference": p.reference,
            "base": answers[i] if answers is not None else None,
        }
        for i, p in enumerate(prompts)
    ]


class HeldOut:
    """The held-out prompts of a run, answered before and after training.

    Args:
        prompts: From :func:`held_out_prompts` (at least one).
        tokenizer: The model's tokenizer.
        batch_size: Prompts answered at once.
    """

    def __init__(self, prompts: Sequence[Prompt], tokenizer: Any, batch_size: int) -> None:
        self.prompts = list(prompts)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        # Fixed once, so that the base and the fine-tuned model answer under the same limit.
        self.max_new_tokens = new_tokens(tokenizer, [p for p in prompts if p.scored] or prompts)

    @classmethod
    def build(
        cls, rows: Sequence[Mapping[str, Any]], tokenizer: Any, max_length: int, batch_size: int
    ) -> HeldOut | None:
        """The held-out prompts of evaluation ``rows`` (``sft`` rows); ``None`` if none has one."""
        prompts = held_out_prompts(rows, tokenizer, max_length)
        return cls(prompts, tokenizer, batch_size) if prompts else None

    def answer(self, model: Any, metrics: dict[str, Any] | None, what: str) -> list[str]:
        """``model``'s answers to the samples' prompts.

        Args:
            model: The model to ask.
            metrics: Where the exact match and ROUGE-L of its answers to every scored prompt go
                (in place); ``None`` answers the samples only.
            what: The model's name in the progress bar and the log (``"zero-shot"``).
        """
        scored = [p for p in self.prompts if p.scored]
        asked = self.prompts if metrics is not None and scored else self.prompts[:SAMPLES]
        answers = generate(
            model,
            self.tokenizer,
            asked,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            desc=f"generate ({what})",
        )
        if metrics is not None and scored:
            pairs = [(a, p.reference) for a, p in zip(answers, asked, strict=True) if p.scored]
            metrics.update(generation_metrics([a for a, _ in pairs], [r for _, r in pairs]))
            logger.info(
                "%s: exact match %.4f, ROUGE-L %.4f on %d held-out prompts",
                what,
                metrics[EXACT_MATCH],
                metrics[ROUGE_L],
                len(pairs),
            )
        return answers[:SAMPLES]

    def samples(self, base: Sequence[str] | None) -> list[dict[str, str | None]]:
        """The report's samples with the base model's answers (``None``: not known)."""
        return samples_record(self.prompts[:SAMPLES], base)

    def resumed_samples(self, saved: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
        """A resumed run's samples: its checkpoint's, with their base answers, if they are of
        these prompts; else these prompts without base answers."""
        fresh = self.samples(None)
        base = [dict(s) for s in saved or []]
        same = [b.get("prompt") for b in base] == [f["prompt"] for f in fresh]
        return base if same else fresh

    @staticmethod
    def add_fine_tuned(samples: Sequence[dict[str, Any]], answers: Sequence[str]) -> None:
        """Puts the fine-tuned model's ``answers`` into ``samples`` (in place)."""
        for sample, answer in zip(samples, answers, strict=True):
            sample["fine_tuned"] = answer
