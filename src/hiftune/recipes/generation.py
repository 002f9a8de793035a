"""How well generated answers match the references: exact match and ROUGE-L.

The two standard scores of instruction tuning's held-out answers, averaged over the prompts:

* **exact match**: the answer equals the reference after SQuAD's normalisation (lower case, no
  punctuation, no articles ``a``/``an``/``the``, whitespace collapsed), so ``"Paris."`` matches
  ``"paris"`` but ``"It is Paris"`` does not;
* **ROUGE-L**: the F-measure of the longest common subsequence of words, computed by Google's
  ``rouge-score`` package. Its default tokenizer keeps ASCII letters and digits only, which
  scores any other script as empty; words here are lower-cased Unicode word runs instead (the
  same words for English text).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

#: The keys :func:`generation_metrics` adds to a run's metrics.
EXACT_MATCH, ROUGE_L, GENERATION_PROMPTS = "exact_match", "rouge_l", "generation_prompts"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_WORDS = re.compile(r"\w+")


def normalize_answer(text: str) -> str:
    """``text`` as exact match compares it (SQuAD's normalisation)."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(answer: str, reference: str) -> bool:
    """Whether ``answer`` is ``reference`` up to case, punctuation, articles and spacing."""
    return normalize_answer(answer) == normalize_answer(reference)


class _Words:
    """``rouge-score``'s tokenizer interface: lower-cased Unicode word runs."""

    def tokenize(self, text: str) -> list[str]:
        return _WORDS.findall(text.lower())


def rouge_l(answers: Sequence[str], references: Sequence[str]) -> list[float]:
    """The ROUGE-L F-measure of each answer against its reference (0 when either has no word)."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer: Any = RougeScorer(["rougeL"], tokenizer=_Words())
    return [
        float(scorer.score(reference, answer)["rougeL"].fmeasure)
        for answer, reference in zip(answers, references, strict=True)
    ]


def generation_metrics(answers: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact match and ROUGE-L of ``answers`` against ``references``, and their count.

    Raises:
        ValueError: If the two differ in length or are empty.
    """
    if len(answers) != len(references) or not answers:
        raise ValueError(
            f"need as many answers as references, at least one: {len(answers)}, {len(references)}"
        )
    matches = [exact_match(a, r) for a, r in zip(answers, references, strict=True)]
    rouge = rouge_l(answers, references)
    return {
        EXACT_MATCH: sum(matches) / len(matches),
        ROUGE_L: sum(rouge) / len(rouge),
        GENERATION_PROMPTS: len(answers),
    }
