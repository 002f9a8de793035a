"""The architecture presets of the memory tools against their published parameter counts."""

from __future__ import annotations

import pytest

from hiftune.memory.configs import CONFIGS, build_model, new_head_parameters, resolve_config

# Total parameters in billions, as published (Qwen2.5-7B's model card: 7.61B; the Gemma 2 report:
# 2.61B for the 2B model; Llama 2 paper / Llama 3.1 card figures as commonly quoted: 6.74B, 8.03B).
# The tolerance covers the publishers' rounding or truncation to two decimals.
PUBLISHED = {
    "llama-2-7b": 6.74,
    "llama-3.1-8b": 8.03,
    "qwen2.5-7b": 7.61,
    "gemma-2-2b": 2.61,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_has_the_published_size(name: str) -> None:
    model = build_model(resolve_config(name), device="meta")
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions == pytest.approx(PUBLISHED[name], abs=0.006)


def test_every_preset_builds_on_meta() -> None:
    for name in CONFIGS:
        model = build_model(resolve_config(name), device="meta")
        assert all(p.is_meta for p in model.parameters())


# --- heads -----------------------------------------------------------------------------------


def test_the_task_names_of_before_keep_their_heads():
    from hiftune.memory.configs import TASK_HEADS

    old = {"causal-lm": "causal-lm", "prompt-cls": "causal-lm", "sft": "causal-lm"}
    assert {t: TASK_HEADS[t] for t in (*old, "seq-cls")} == {**old, "seq-cls": "seq-cls"}
    assert list(TASK_HEADS)[:4] == ["causal-lm", "prompt-cls", "sft", "seq-cls"]


@pytest.mark.parametrize(
    ("head", "cls"),
    [
        ("seq2seq-lm", "T5ForConditionalGeneration"),
        ("speech-seq2seq", "WhisperForConditionalGeneration"),
        ("image-cls", "ViTForImageClassification"),
        ("ctc", "Wav2Vec2ForCTC"),
        ("image-text-to-text", "LlavaForConditionalGeneration"),
    ],
)
def test_every_head_builds_its_class_on_meta(head, cls):
    from tinymodels import tiny_head_config

    model = build_model(tiny_head_config(head), head, num_labels=5, device="meta")
    assert type(model).__name__ == cls
    # Also wav2vec2's masked_spec_embed, made by a constructor that ignores the device context.
    assert all(p.is_meta for p in model.parameters())
    if head == "image-cls":
        assert model.classifier.out_features == 5


@pytest.mark.parametrize(
    ("head", "family", "message"),
    [
        (
            "causal-lm",
            "vit",
            "a vit model cannot do causal-lm: AutoModelForCausalLM has no class "
            "for it; its heads: image-cls",
        ),
        (
            "seq2seq-lm",
            "llama",
            "a llama model cannot do seq2seq-lm: AutoModelForSeq2SeqLM has no "
            "class for it; its heads: causal-lm, seq-cls",
        ),
        (
            "ctc",
            "whisper",
            "a whisper model cannot do ctc: AutoModelForCTC has no class for it; "
            "its heads: causal-lm, speech-seq2seq",
        ),
    ],
)
def test_a_head_the_architecture_lacks_is_one_clear_line(head, family, message):
    from hiftune.errors import UserError
    from tinymodels import tiny_hf_config, tiny_modality_model

    config = tiny_hf_config(family) if family == "llama" else tiny_modality_model(family).config
    with pytest.raises(UserError) as e:
        build_model(config, head, device="meta")
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("name", "task", "new"),
    [
        ("smollm2-135m", "causal-lm", []),  # the LM head comes with the checkpoint (tied here)
        ("smollm2-135m", "prompt-cls", []),
        ("smollm2-135m", "seq-cls", ["score.weight"]),
        ("roberta-base", "seq-cls", [f"classifier.{p}.{t}" for p in ("dense", "out_proj")
                                      for t in ("weight", "bias")]),
    ],
)  # fmt: skip
def test_new_head_parameters_are_a_class_head_outside_the_base_model(
    name: str, task: str, new: list[str]
) -> None:
    model = build_model(resolve_config(name), task=task, device="meta")
    assert new_head_parameters(model, task) == new


def test_a_path_that_is_not_a_hub_id_is_not_tried_on_the_hub() -> None:
    with pytest.raises(ValueError, match=r"neither a preset .* holding one$"):
        resolve_config("no/such/config.json")
