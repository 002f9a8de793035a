"""The schedule options settled for the loaded model: update budget, ``auto`` m, always-active."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from torch import nn

from hiftune.errors import UserError
from hiftune.recipes.config import TrainRecipeConfig
from hiftune.recipes.schedule import (
    AlwaysActive,
    choose_units_per_group,
    parse_always_active,
    parse_units_per_group,
    planned_steps,
    resolve_always_active,
    resolve_schedule,
    steps_for_updates,
    updates_per_group,
)


def simulated_updates(total: int, k: int, K: int) -> list[int]:
    """The reference: walk the queue step by step (K steps per visit, k groups in turn)."""
    counts = [0] * k
    position = visit = 0
    for _ in range(total):
        counts[position] += 1
        visit += 1
        if visit == K:
            visit, position = 0, (position + 1) % k
    return counts


@pytest.mark.parametrize("K", [1, 2, 3])
def test_updates_per_group_walks_the_queue(K: int) -> None:
    for k in (1, 2, 5, 10):
        for total in range(0, 3 * k * K + 2):
            assert updates_per_group(total, k, K) == simulated_updates(total, k, K), (total, k)
    # The case: 8 steps over 10 groups leave the last two untrained.
    assert updates_per_group(8, 10) == [1] * 8 + [0, 0]
    assert updates_per_group(200, 10) == [20] * 10


@pytest.mark.parametrize("K", [1, 2, 3])
def test_steps_for_updates_is_the_fewest(K: int) -> None:
    for k in (1, 3, 10):
        for u in (1, 7, 8):
            needed = steps_for_updates(k, K, u)
            assert min(simulated_updates(needed, k, K)) >= u
            assert min(simulated_updates(needed - 1, k, K)) < u
    assert steps_for_updates(10, 1, 8) == 80 and steps_for_updates(10, 3, 8) == 89


@pytest.mark.parametrize(
    ("n", "total", "K", "smallest", "expected"),
    [
        (39, 200, 1, 4, 4),  # the demo's 39 units and 200 steps: 10 groups of 20 updates
        (39, 200, 1, 1, 2),  # without the floor: 20 groups of 10 updates
        (39, 45, 1, 4, 8),  # 5 groups of 9 updates (m = 7 would give 6 groups of 7)
        (39, 8, 1, 4, 39),  # too few steps for any split: all units in one group
        (39, 2, 1, 4, 39),
        (39, 200, 2, 1, 2),
        (39, 30, 2, 4, 13),  # 3 groups x 2 steps: 5 cycles of 10 updates
        (4, 32, 1, 1, 1),
        (4, 32, 1, 4, 4),
        (4, 8, 1, 4, 4),
        (3, 100, 1, 4, 3),  # fewer units than the floor: all of them
        (10, 30, 2, 1, 4),
        (1, 1, 1, 4, 1),
    ],
)
def test_choose_units_per_group(n: int, total: int, K: int, smallest: int, expected: int) -> None:
    assert choose_units_per_group(n, total, K, smallest=smallest) == expected
    # The reference: the first m from the floor up whose groups all get 8 in the walked queue.
    ms = range(min(smallest, n), n + 1)
    fits = [m for m in ms if min(simulated_updates(total, math.ceil(n / m), K)) >= 8]
    assert expected == (fits[0] if fits else n)


def test_planned_steps_counts_like_the_trainer() -> None:
    assert planned_steps(1600, batch_size=8) == 200  # the demo
    assert planned_steps(36, batch_size=4, epochs=2.5) == 23  # ceil(2.5 * 9)
    assert (
        planned_steps(37, batch_size=4) == 10
        and planned_steps(37, batch_size=4, drop_last=True) == 9
    )
    assert planned_steps(37, batch_size=4, grad_accum=3) == 4  # 10 batches: 3 + 3 + 3 + 1
    assert planned_steps(37, batch_size=4, processes=2) == 5
    assert planned_steps(37, batch_size=4, max_steps=8) == 8
    assert planned_steps(2, batch_size=4, drop_last=True) == 1  # the Trainer's max(..., 1)


def test_option_values() -> None:
    assert parse_units_per_group(" AUTO ") == "auto" and parse_units_per_group(3) == 3
    assert parse_always_active("Auto") == "auto" and parse_always_active("none") == "none"
    assert parse_always_active("classifier\\..*, score\\.weight") == [
        "classifier\\..*",
        "score\\.weight",
    ]
    assert parse_always_active([]) == "none" and parse_always_active(["a.b"]) == ["a.b"]


# --- always-active parameters ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_classifier(tiny_bert: Path) -> tuple[nn.Module, list[str]]:
    """The tiny bert checkpoint loaded with a new classification head, and its new weights."""
    from hiftune.recipes.models import load_model_and_tokenizer

    model, _, new = load_model_and_tokenizer(tiny_bert, "seq-cls", loading_info=True)
    return model, new


def test_auto_takes_a_new_head(bert_classifier: tuple[nn.Module, list[str]]) -> None:
    model, new = bert_classifier
    assert sorted(new) == ["classifier.bias", "classifier.weight"]  # the loader's missing keys
    always = resolve_always_active(model, "auto", new)
    assert always == AlwaysActive(
        ("classifier\\.weight", "classifier\\.bias"), ("classifier.weight", "classifier.bias")
    )
    assert resolve_always_active(model, "none", new) == AlwaysActive()
    assert resolve_always_active(model, "auto", []) == AlwaysActive()  # a complete checkpoint
    given = resolve_always_active(model, ["classifier\\..*", "bert\\.pooler\\.dense\\.bias"])
    assert given.names == ("bert.pooler.dense.bias", "classifier.weight", "classifier.bias")
    with pytest.raises(UserError, match=r"--always-active: .*\['score\\\\\..\*'\] match no"):
        resolve_always_active(model, ["score\\..*"])


def test_auto_leaves_a_large_new_part_in_the_split(
    bert_classifier: tuple[nn.Module, list[str]],
) -> None:
    model, new = bert_classifier
    # As if the checkpoint had no word embeddings either: 9% of the model is new.
    fresh = [*new, "bert.embeddings.word_embeddings.weight"]
    always = resolve_always_active(model, "auto", fresh)
    assert always.patterns == () and always.note is not None
    assert always.note.startswith(
        "the new parameters (bert.embeddings.word_embeddings.weight, classifier.weight, "
        "classifier.bias) stay in the unit split"
    )
    assert "are 9% of the model, more than the 5% auto trains at every step" in always.note


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_auto_leaves_a_new_weight_tied_to_an_old_one() -> None:
    model = Tied()
    always = resolve_always_active(model, "auto", ["head.weight"])
    assert always.patterns == ()
    assert always.note == (
        "the new parameters (head.weight) stay in the unit split; --always-active REGEX trains "
        "them at every step anyway: head.weight is tied to a checkpoint weight"
    )


def test_resolve_schedule() -> None:
    cfg = TrainRecipeConfig(units_per_group="auto", steps_per_group=2, always_active_lr_scale=3)
    head = AlwaysActive(("score\\.weight",), ("score.weight",))
    s = resolve_schedule(cfg, always=head, n_units=39, total_steps=200)
    assert (s.units_per_group, s.steps_per_group, s.always_active_lr_scale) == (4, 2, 3)
    assert s.units_reason == (
        "auto: the smallest m from 4 up whose groups each get at least 8 updates in 200 steps"
    )
    assert (s.always_active, s.always_active_names) == (("score\\.weight",), ("score.weight",))
    short = resolve_schedule(cfg, n_units=39, total_steps=5)
    assert short.units_per_group == 39 and "all 39 units in one group, and still fewer" in (
        short.units_reason or ""
    )
    unknown = resolve_schedule(cfg, n_units=39)
    assert unknown.units_per_group == 4 and "the number of optimizer steps is not known" in (
        unknown.units_reason or ""
    )
    resumed = resolve_schedule(cfg, n_units=39, total_steps=8, resumed_units_per_group=5)
    assert resumed.units_per_group == 5 and "resumed" in (resumed.units_reason or "")
    fixed = resolve_schedule(TrainRecipeConfig(units_per_group=3), n_units=39, total_steps=8)
    assert (fixed.units_per_group, fixed.units_reason) == (3, None)
    # FPFT: no always-active parameters, whatever auto found.
    fpft = resolve_schedule(TrainRecipeConfig(method="fpft"), always=head, n_units=39)
    assert fpft.always_active == () and fpft.always_active_names == ()
    notes = resolve_schedule(cfg, always=AlwaysActive(note="tied"), n_units=39, total_steps=80)
    assert notes.notes == ["tied"]


def test_auto_detects_the_new_head_of_a_causal_checkpoint(tmp_path: Path) -> None:
    from hiftune.recipes.models import load_model_and_tokenizer
    from recipes.conftest import make_llama

    path = make_llama(tmp_path / "llama", tie_word_embeddings=False)
    model, _, new = load_model_and_tokenizer(path, "seq-cls", loading_info=True)
    assert new == ["score.weight"]
    assert resolve_always_active(model, "auto", new).names == ("score.weight",)
