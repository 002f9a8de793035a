"""``hiftune inspect --task HEAD`` for encoder-decoders, vision and audio models."""

from __future__ import annotations

import json

import pytest

from hiftune.cli import main

pytest.importorskip("transformers")


def test_a_speech_seq2seq_model_lists_encoder_then_decoder_blocks(tmp_path, capsys):
    from tinymodels import tiny_head_config

    tiny_head_config("speech-seq2seq").save_pretrained(tmp_path)
    argv = ["inspect", str(tmp_path), "--task", "speech-seq2seq", "--max-unit-params", "none"]
    argv += ["-m", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path} (WhisperForConditionalGeneration, speech-seq2seq): ")
    table = [line for line in out.splitlines() if line.startswith("| ")][1:]  # no header
    rows = [[c.strip() for c in line.strip("|").split("|")][:4] for line in table]
    assert rows == [
        ["1", "embed", "embed", ""],
        ["2", "layers.0", "layers.0", "model.encoder.layers.0"],
        ["3", "layers.1", "layers.1", "model.encoder.layers.1"],
        ["4", "between.2", "between.2", ""],
        ["5", "layers.2", "layers.2", "model.decoder.layers.0"],
        ["6", "layers.3", "layers.3", "model.decoder.layers.1"],
        ["7", "head", "head", ""],
    ]
    assert out.rstrip().endswith("No warnings.")


@pytest.mark.parametrize("head", ["seq2seq-lm", "image-cls", "ctc", "image-text-to-text"])
def test_every_new_head_is_a_task_choice(tmp_path, capsys, head):
    from tinymodels import tiny_head_config

    tiny_head_config(head).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--task", head, "--json", "-m", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["units_per_group"] == 2 and out["groups"][0]["index"] == 0
    assert not any("gradient check skipped" in w for w in out["warnings"])


def test_a_head_the_architecture_lacks_is_one_line_and_exit_2(tmp_path, capsys):
    from tinymodels import tiny_head_config

    tiny_head_config("ctc").save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--task", "image-text-to-text"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "hiftune inspect: error: a wav2vec2 model cannot do image-text-to-text: "
        "AutoModelForImageTextToText has no class for it; its heads: ctc"
    ]
