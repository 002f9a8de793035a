"""The run's examples: user data used whole, the demo's subsets, fields, classes, sft rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from hiftune.recipes.config import TrainRecipeConfig
from hiftune.recipes.examples import load_examples
from hiftune.recipes.sources import DataError
from recipes.hubcache import write_jsonl

pytestmark = pytest.mark.usefixtures("datasets_cache")


def dataset(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list(rows)


def test_user_data_is_used_whole_and_the_demo_keeps_its_subset(tmp_path: Path) -> None:
    rows = [{"text": f"a film number {i}", "label": i % 3} for i in range(2500)]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    ex = load_examples(TrainRecipeConfig(data=str(path), task="seq-cls"))
    assert (len(ex.splits["train"]), len(ex.splits["eval"])) == (2250, 250)  # nothing subsampled
    assert ex.classes == ["0", "1", "2"] and ex.eval_split == "validation"
    assert ex.description == (
        "train: 2,250 ('train' split without the held-out examples); "
        "eval: 250 ('validation': 0.1 of 'train' held out (seed 1234))"
    )
    texts = {r["text"] for split in ex.splits.values() for r in split}
    assert texts == {r["text"] for r in rows}  # every example, in one split or the other
    cfg = TrainRecipeConfig(data=str(path), task="seq-cls", train_samples=100, eval_samples="7")
    ex = load_examples(cfg)
    assert (len(ex.splits["train"]), len(ex.splits["eval"])) == (100, 7)
    assert ex.description.startswith("train: 100 of 2,250")
    ex = load_examples(TrainRecipeConfig())  # the bundled demo: as before
    assert (len(ex.splits["train"]), len(ex.splits["eval"])) == (1600, 500)
    assert ex.eval_split == "test" and ex.description == (
        "bundled sentiment data: train: 1,600 of 8,570 ('train' split, seeded subset); "
        "eval: 500 of 1,000 ('test' split, the first ones)"
    )
    ex = load_examples(TrainRecipeConfig(train_samples="all", eval_samples="all"))
    assert (len(ex.splits["train"]), len(ex.splits["eval"])) == (8570, 1000)


def test_missing_fields_are_named_with_the_fields_there_are(tmp_path: Path) -> None:
    import datasets

    path = write_jsonl(tmp_path / "d.jsonl", [{"sentence": "a", "y": 1}] * 5)
    with pytest.raises(
        DataError, match=r"field 'text' \(--text-field\) is not in .*its fields are: sentence, y"
    ):
        load_examples(TrainRecipeConfig(data=str(path)))
    # The training split decides the sft format; an evaluation split without its fields is named.
    datasets.DatasetDict(
        train=dataset([{"prompt": "p", "response": "r"}] * 4),
        test=dataset([{"prompt": "p", "answer": "r"}] * 2),
    ).save_to_disk(str(tmp_path / "pairs"))
    cfg = TrainRecipeConfig(data=str(tmp_path / "pairs"), task="sft")
    with pytest.raises(
        DataError, match=r"field 'response' \(--response-field\) is not in .*\('test' split\)"
    ):
        load_examples(cfg)


def test_classes_span_every_split_and_sft_rows_are_normalized(tmp_path: Path) -> None:
    import datasets

    datasets.DatasetDict(
        train=dataset([{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}] * 3),
        validation=dataset([{"text": "c", "label": "mixed"}]),
    ).save_to_disk(str(tmp_path / "cls"))
    ex = load_examples(TrainRecipeConfig(data=str(tmp_path / "cls"), task="seq-cls"))
    assert ex.classes == ["mixed", "neg", "pos"]
    assert ex.splits["eval"] == [{"text": "c", "label": 0}]
    chats = [
        {"conv": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(10)
    ]
    path = write_jsonl(tmp_path / "chats.jsonl", chats)
    cfg = TrainRecipeConfig(data=str(path), task="sft", messages_field="conv", eval_fraction=0.2)
    ex = load_examples(cfg)
    assert ex.classes is None and (len(ex.splits["train"]), len(ex.splits["eval"])) == (8, 2)
    assert all(
        r["messages"][1] == {"role": "assistant", "content": "a"} for r in ex.splits["train"]
    )
    assert ex.description.startswith("train: 8 ") and ex.eval_split == "validation"
    with pytest.raises(DataError, match="the bundled data has no evaluation split 'dev'"):
        load_examples(TrainRecipeConfig(eval_split="dev"))


def test_sharegpt_and_alpaca_files_and_a_file_mixing_formats(tmp_path: Path) -> None:
    turns = [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello there!"}]
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": turns}] * 4)
    cfg = TrainRecipeConfig(
        data=str(sharegpt), task="sft", eval_fraction=0.25, system_prompt="Be brief."
    )
    (row, *_) = load_examples(cfg).splits["train"]
    assert row == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": "Hello there!"},
        ],
        "first_trained": 0,
    }
    # Alpaca: the input is optional per row (an Arrow null where a row has none).
    alpaca = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [{"instruction": "Say hello.", "input": "Be brief.", "output": "Hi"}]
        + [{"instruction": "Say hello.", "output": "Hello there!"}] * 3,
    )
    rows = load_examples(TrainRecipeConfig(data=str(alpaca), task="sft", eval_fraction=0.25))
    assert {r["prompt"] for split in rows.splits.values() for r in split} == {
        "Say hello.\n\nBe brief.",
        "Say hello.",
    }
    mixed = write_jsonl(
        tmp_path / "mixed.jsonl",
        [{"conversations": turns}] * 3 + [{"instruction": "Say hello.", "output": "Hi"}],
    )
    with pytest.raises(
        DataError,
        match=r"row \d of .*mixed.jsonl.* has no 'conversations', which every row of this data "
        r"needs: its fields make it sharegpt data, but this row has instruction, output: one "
        "dataset cannot mix sft formats",
    ):
        load_examples(TrainRecipeConfig(data=str(mixed), task="sft", eval_fraction=0.25))
    with pytest.raises(DataError, match="--chat-template 'nope' is neither a file nor a Jinja"):
        load_examples(TrainRecipeConfig(data=str(alpaca), task="sft", chat_template="nope"))
