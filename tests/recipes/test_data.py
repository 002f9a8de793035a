"""The bundled sentiment task, user files, prompt formats and the collator."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from hiftune.recipes import data as D


def test_bundled_sentiment_binarisation_and_fixed_splits() -> None:
    rows = D.load_sentiment()
    assert len(rows) == 10070
    assert sum(r["label"] for r in rows) == 4995
    assert all(abs(r["score"]) >= D.SENTIMENT_THRESHOLD for r in rows)
    assert all(r["label"] == int(r["score"] > 0) for r in rows)
    assert len({r["text"] for r in rows}) == len(rows)
    a, b = D.sentiment_splits(), D.sentiment_splits()
    assert {k: len(v) for k, v in a.items()} == {"test": 1000, "validation": 500, "train": 8570}
    assert a == b  # the same splits on every call, independent of any training seed
    texts = {k: {r["text"] for r in v} for k, v in a.items()}
    assert not texts["test"] & texts["train"] and not texts["validation"] & texts["train"]


def test_binarisation_rule_on_a_small_file(tmp_path: Path) -> None:
    path = tmp_path / "gt.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write(
            'id,sentiment,text\n1,0.5,"ok good"\n2,-0.49,meh\n3,-2,bad\n4,1,"ok good"\n5,0.3,so\n'
        )
    rows = D.load_sentiment(path)
    assert [(r["text"], r["label"]) for r in rows] == [("ok good", 1), ("bad", 0)]


def test_subsample_is_seeded() -> None:
    rows = [{"i": i} for i in range(100)]
    assert D.subsample(rows, 10, 1) == D.subsample(rows, 10, 1)
    assert D.subsample(rows, 10, 1) != D.subsample(rows, 10, 2)
    assert D.subsample(rows, None, 1) == rows
    picked = D.sample_indices(100, 10, 1)
    assert picked == sorted(set(picked)) and D.subsample(rows, 10, 1) == [rows[i] for i in picked]


def test_user_records_from_a_file_through_datasets(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"t": "a", "y": 1}\n\n{"t": "b", "y": 0}\n')
    records = D.select_fields(D.read_records(path), {"text": "t", "label": "y"}, str(path))
    assert [r["text"] for r in records] == ["a", "b"]
    encoded, classes = D.encode_labels(records)
    assert classes == ["0", "1"] and [r["label"] for r in encoded] == [1, 0]


def test_missing_field_names_the_available_fields() -> None:
    records = [{"sentence": "a", "sentiment": 1}]
    with pytest.raises(D.DataError, match=r"'text' \(--text-field\).*sentence, sentiment"):
        D.select_fields(records, {"text": "text"}, "f.jsonl")


def test_labels_need_two_classes() -> None:
    with pytest.raises(D.DataError, match="at least two"):
        D.encode_labels([{"label": "x"}, {"label": "x"}])
    encoded, classes = D.encode_labels([{"label": "pos"}, {"label": "neg"}, {"label": 10}])
    assert classes == ["10", "neg", "pos"] and [r["label"] for r in encoded] == [2, 1, 0]


def test_prompt_format_and_label_tokens(word_tokenizer) -> None:
    tok = word_tokenizer
    fmt = D.PromptFormat()
    assert fmt.prompt(" a good film ") == "a good film It was"
    ids = fmt.label_token_ids(tok)
    assert ids == [tok.convert_tokens_to_ids("terrible"), tok.convert_tokens_to_ids("great")]
    with pytest.raises(D.DataError, match="same token"):
        D.PromptFormat(label_words=("zzz", "qqq")).label_token_ids(tok)  # both <unk>
    with pytest.raises(D.DataError, match=r"\{text\}"):
        D.PromptFormat(template="no placeholder")


def test_encode_prompt_cls_truncates_from_the_left(word_tokenizer) -> None:
    tok = word_tokenizer
    fmt = D.PromptFormat(template="{text} it was")
    (ex,) = D.encode_prompt_cls([{"text": "a good film " * 10, "label": 1}], tok, fmt, 5)
    assert len(ex["input_ids"]) == 5 and ex["labels"] == 1
    assert tok.decode(ex["input_ids"][-2:]) == "it was"


def test_collator_pads_left_with_positions_and_right_with_ignored_labels() -> None:
    feats = [{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": [8], "labels": 0}]
    b = D.PadCollator(0, "left", position_ids=True)(feats)
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert b["labels"].tolist() == [1, 0]
    feats = [{"input_ids": [5, 6], "labels": [-100, 6]}, {"input_ids": [8], "labels": [8]}]
    b = D.PadCollator(0, "right")(feats)
    assert b["labels"].tolist() == [[-100, 6], [8, -100]]
    assert b["labels"].dtype == torch.long


def test_bundled_sentiment_as_sft_pairs():
    pairs = D.as_sft([{"text": "A dull film.", "label": 0}, {"text": "A joy.", "label": 1}])
    assert [p["completion"] for p in pairs] == ["negative", "positive"]
    assert pairs[0]["prompt"].endswith("\n\nA dull film.") and "{text}" not in pairs[1]["prompt"]


def test_an_empty_value_is_named_by_the_user_s_field_and_option() -> None:
    records = [{"review": "good", "stars": 1}, {"review": " ", "stars": 0}]
    # The message shows the record: its index in a sampled or held-out split is not a file line.
    expected = r"^f.csv has a record with an empty 'review' \(--text-field\): \{'review': ' ', "
    with pytest.raises(D.DataError, match=expected):
        D.select_fields(records, {"text": "review", "label": "stars"}, "f.csv")
    assert D.select_fields(records[:1], {"text": "review", "label": "stars"}, "f.csv") == [
        {"text": "good", "label": 1}
    ]


SFT_FIELDS = {
    "messages": "messages",
    "prompt": "prompt",
    "completion": "completion",
    "response": "response",
    "text": "text",
}


@pytest.mark.parametrize(
    ("columns", "hint"),
    [
        (["messages"], "; this looks like chat data: use --task sft"),
        (["prompt", "completion"], "; this looks like prompt/completion data: use --task sft"),
        (["text"], ""),  # plain text lacks a label; it is not another task's format
        (["review", "stars"], ""),
    ],
)
def test_sft_hint(columns: list[str], hint: str) -> None:
    assert D.sft_hint(columns, SFT_FIELDS) == hint


def test_chat_data_without_task_sft_suggests_it(tmp_path: Path) -> None:
    from hiftune.recipes.config import build_config
    from hiftune.recipes.examples import load_examples

    path = tmp_path / "chats.jsonl"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path.write_text("".join(json.dumps({"messages": chat}) + "\n" for _ in range(4)))
    with pytest.raises(D.DataError, match=r"fields are: messages; .* use --task sft$"):
        load_examples(build_config({"data": [str(path)]}))
