"""Building the task of a configuration: which encoding, collation, loss and metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from hiftune.recipes import chat
from hiftune.recipes.config import TrainRecipeConfig
from hiftune.recipes.models import load_model_and_tokenizer
from hiftune.recipes.sources import DataError
from hiftune.recipes.tasks import PromptClsTask, SeqClsTask, SftTask, build_task


def test_sft_task_encodes_every_row_format(tiny_llama: Path) -> None:
    model, tok = load_model_and_tokenizer(tiny_llama, "sft")
    task = build_task(TrainRecipeConfig(task="sft", max_length=64), model, tok, None)
    assert isinstance(task, SftTask) and task.compute_metrics is None and task.compute_loss is None
    rows = [
        *chat.normalize_rows(
            [{"prompt": "a good film", "completion": "positive"}], "prompt-completion", "x"
        ),
        *chat.normalize_rows([{"text": "a good film"}], "text", "x"),
        *chat.normalize_rows(
            [
                {
                    "messages": [
                        {"role": "user", "content": "a film"},
                        {"role": "assistant", "content": "good"},
                    ]
                }
            ],
            "messages",
            "x",
        ),
    ]
    pair, text, conversation = task.encode(rows)
    learned = [
        tok.decode([t for t in ex["labels"] if t != -100]) for ex in (pair, text, conversation)
    ]
    assert learned == ["positive </s>", tok.decode(text["input_ids"]), "good </s>"]
    batch = task.collator()([pair, text])
    assert batch["labels"].shape == batch["input_ids"].shape  # right-padded, padding ignored
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_classification_tasks_and_their_label_words(tiny_llama: Path) -> None:
    model, tok = load_model_and_tokenizer(tiny_llama, "prompt-cls")
    task = build_task(TrainRecipeConfig(), model, tok, ["negative", "positive"])
    assert isinstance(task, PromptClsTask) and task.fmt.label_words == ("terrible", "great")
    with pytest.raises(DataError, match="give one --label-words word per class"):
        build_task(TrainRecipeConfig(), model, tok, ["a", "b", "c"])
    cfg = TrainRecipeConfig(label_words=["bad", "fun", "good"])
    assert build_task(cfg, model, tok, ["a", "b", "c"]).fmt.label_words == ("bad", "fun", "good")
    assert isinstance(
        build_task(TrainRecipeConfig(task="seq-cls"), model, tok, ["a", "b"]), SeqClsTask
    )
