"""Exact match and ROUGE-L of generated answers, against values worked out by hand."""

from __future__ import annotations

import pytest

from hiftune.recipes.generation import exact_match, generation_metrics, rouge_l


@pytest.mark.parametrize(
    ("answer", "reference", "match"),
    [
        ("Paris.", "paris", True),
        ("  The   Eiffel tower!", "eiffel Tower", True),  # articles, case, spacing
        ("It is Paris", "Paris", False),
        ("", "Paris", False),
    ],
)
def test_exact_match_is_squads(answer: str, reference: str, match: bool) -> None:
    assert exact_match(answer, reference) is match


def test_rouge_l_is_the_f_measure_of_the_longest_common_subsequence() -> None:
    # LCS "the cat on the mat" = 5 words: precision 5/5, recall 5/6, F = 10/11.
    (score,) = rouge_l(["the cat on the mat"], ["the cat sat on the mat"])
    assert score == pytest.approx(10 / 11)
    assert rouge_l(["Mat, the cat."], ["the cat mat"]) == [pytest.approx(2 / 3)]  # LCS 2 of 3
    assert rouge_l(["nothing alike"], ["the cat"]) == [0.0]


def test_rouge_l_counts_words_of_any_script() -> None:
    # rouge-score's own tokenizer keeps [a-z0-9] only: this would score 0.
    assert rouge_l(["Привет"], ["привет мир"]) == [pytest.approx(2 / 3)]


def test_generation_metrics_average_over_the_answers() -> None:
    metrics = generation_metrics(
        ["Paris.", "the cat on the mat"], ["Paris", "the cat sat on the mat"]
    )
    assert metrics == {
        "exact_match": 0.5,
        "rouge_l": pytest.approx((1 + 10 / 11) / 2),
        "generation_prompts": 2,
    }
    with pytest.raises(ValueError, match="as many answers as references"):
        generation_metrics([], [])
