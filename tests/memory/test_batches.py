"""Dummy batches of the memory tools: what each head's forward and loss take."""

from __future__ import annotations

import pytest

from hiftune.memory.batches import dummy_batches
from hiftune.memory.configs import build_model
from tinymodels import tiny_head_config

pytest.importorskip("transformers")


@pytest.mark.parametrize(
    ("head", "shapes"),
    [
        ("seq2seq-lm", {"input_ids": (3, 5), "decoder_input_ids": (3, 5), "labels": (3, 5)}),
        (
            "speech-seq2seq",
            {"input_features": (3, 16, 32), "decoder_input_ids": (3, 5), "labels": (3, 5)},
        ),
        ("image-cls", {"pixel_values": (3, 3, 32, 32), "labels": (3,)}),
        ("ctc", {"input_values": (3, 5), "labels": (3, 2)}),
        # 16 image tokens (one per patch of a 32 x 32 image in 8 x 8 patches) and the text.
        (
            "image-text-to-text",
            {"input_ids": (3, 17), "pixel_values": (3, 3, 32, 32), "labels": (3, 17)},
        ),
    ],
)
def test_dummy_batches_hold_what_each_head_takes(head, shapes):
    model = build_model(tiny_head_config(head), head, device="meta")
    with_labels, without = dummy_batches(model, head, batch_size=3, seq_len=5)
    assert {k: tuple(v.shape) for k, v in with_labels.items()} == shapes
    assert without.keys() == with_labels.keys() - {"labels"}


def test_dummy_labels_are_class_ids_transcripts_and_text_after_the_image():
    def labels(head: str) -> list:
        model = build_model(tiny_head_config(head), head)
        return dummy_batches(model, head, batch_size=2, seq_len=20)[0]["labels"].tolist()

    assert labels("image-cls") == [0, 0]
    assert labels("ctc") == [[1, 2], [1, 2]]
    vlm = build_model(tiny_head_config("image-text-to-text"), "image-text-to-text")
    batch = dummy_batches(vlm, "image-text-to-text", batch_size=2, seq_len=20)[0]
    assert batch["input_ids"][:, :16].eq(95).all() and not batch["input_ids"][:, 16:].eq(95).any()
    assert batch["labels"][:, :16].eq(-100).all()
    assert batch["labels"][:, 16:].tolist() == batch["input_ids"][:, 16:].tolist()
    # Whisper's labels are its decoder's token ids, ending in its end-of-sequence id 2.
    assert labels("speech-seq2seq") == [[0] * 19 + [2]] * 2
