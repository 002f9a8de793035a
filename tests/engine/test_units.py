"""The unit split: Hugging Face families (skipped without transformers), custom stacks, overrides."""

import pytest
import torch
from torch import nn

from hiftune import HiFTConfig, split_units
from hiftune.engine.units import find_blocks, group_units
from tinymodels import TinyLM, tiny_hf_config

FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "gpt_neo", "opt", "bert", "roberta"]


def _check_partition(model: nn.Module, units) -> None:
    """Every trainable parameter sits in exactly one unit."""
    names = [n for u in units for n in u.params]
    assert len(names) == len(set(names))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(names) == trainable


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_hf_families_split_into_embed_blocks_head(family, task):
    T = pytest.importorskip("transformers")
    config = tiny_hf_config(family)
    if task == "causal-lm":
        model = T.AutoModelForCausalLM.from_config(config)
    else:
        config.num_labels = 3
        model = T.AutoModelForSequenceClassification.from_config(config)
    units = split_units(model)
    _check_partition(model, units)
    assert [u.name for u in units] == ["embed", "layers.0", "layers.1", "layers.2", "head"]

    embed, head = units[0], units[-1]
    input_embedding = model.get_input_embeddings().weight
    named = dict(model.named_parameters())
    assert any(named[n] is input_embedding for n in embed.params)
    # Each block unit holds exactly the parameters of one block module.
    for u in units[1:-1]:
        block_params = {id(p) for p in model.get_submodule(u.module).parameters()}
        assert {id(named[n]) for n in u.params} == block_params
    # The head holds the final norm and the output layer (unless tied to the embedding).
    out = model.get_output_embeddings() if task == "causal-lm" else None
    if out is not None and out.weight is input_embedding:
        assert not any(named[n] is out.weight for n in head.params)
    elif task == "causal-lm":
        assert any(named[n] is out.weight for n in head.params)
    else:
        head_modules = {"score", "classifier"}
        assert any(n.split(".")[0] in head_modules for n in head.params)
    assert any("norm" in n.lower() or "ln_f" in n for n in head.params) or family in (
        "bert",
        "roberta",
    )


def test_position_embeddings_are_in_the_embedding_unit():
    T = pytest.importorskip("transformers")
    model = T.AutoModelForCausalLM.from_config(tiny_hf_config("gpt2"))
    embed = split_units(model)[0]
    assert set(embed.params) == {"transformer.wte.weight", "transformer.wpe.weight"}


def test_opt_final_norm_goes_to_head_although_registered_before_blocks():
    T = pytest.importorskip("transformers")
    model = T.AutoModelForCausalLM.from_config(tiny_hf_config("opt"))
    units = split_units(model)
    assert "model.decoder.final_layer_norm.weight" in units[-1].params
    assert "model.decoder.project_out.weight" in units[-1].params
    assert "model.decoder.project_in.weight" in units[0].params


def test_tied_weight_is_placed_once_in_the_embedding_unit():
    model = TinyLM(tie=True)
    units = split_units(model)
    _check_partition(model, units)
    assert "embed.weight" in units[0].params
    assert all("lm_head.weight" not in u.params for u in units)
    assert units[-1].params == ("norm.weight", "norm.bias")


def test_plain_custom_stack_and_sequential():
    model = TinyLM(layers=5)
    units = split_units(model)
    assert [u.name for u in units] == ["embed"] + [f"layers.{i}" for i in range(5)] + ["head"]
    assert units[0].params == ("embed.weight", "pos.weight")
    assert [u.module for u in units[1:-1]] == [f"blocks.{i}" for i in range(5)]

    seq = nn.Sequential(nn.Embedding(10, 8), *[nn.Linear(8, 8) for _ in range(3)], nn.LayerNorm(8))
    units = split_units(seq)
    assert [u.name for u in units] == ["embed", "layers.0", "layers.1", "layers.2", "head"]
    assert units[0].params == ("0.weight",) and units[-1].params == ("4.weight", "4.bias")


def test_frozen_parameters_are_left_out_and_empty_units_dropped():
    model = TinyLM()
    model.embed.requires_grad_(False)
    model.pos.requires_grad_(False)
    units = split_units(model)
    assert units[0].name == "layers.0"
    _check_partition(model, units)


def test_unsplittable_model_names_what_it_found_and_how_to_override():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"0 \(Linear\).*blocks=") as e:
        split_units(model)
    assert "units=" in str(e.value)


def test_blocks_override_picks_the_container():
    model = TinyLM(layers=3)
    path, blocks = find_blocks(model, "blocks")
    assert path == "blocks" and blocks == ["blocks.0", "blocks.1", "blocks.2"]
    units = split_units(model, HiFTConfig(blocks="blocks"))
    assert len(units) == 5
    with pytest.raises(ValueError, match="names no submodule"):
        split_units(model, HiFTConfig(blocks="nope.layers"))


def test_units_override_by_regex():
    model = TinyLM(layers=2)
    cfg = HiFTConfig(
        units={
            "bottom": [r"embed\..*", r"pos\..*", r"blocks\.0\..*"],
            "top": [r"blocks\.1\..*", r"norm\..*", r"lm_head\..*"],
        }
    )
    units = split_units(model, cfg)
    assert [u.name for u in units] == ["bottom", "top"]
    _check_partition(model, units)


def test_units_override_errors():
    model = TinyLM(layers=2)
    with pytest.raises(ValueError, match=r"leaves 1 trainable parameter\(s\) in no unit: lm_head"):
        split_units(model, HiFTConfig(units={"a": [r"(embed|pos|blocks|norm)\..*"]}))
    with pytest.raises(ValueError, match="more than one unit"):
        split_units(model, HiFTConfig(units={"a": [r".*"], "b": [r"lm_head\..*"]}))
    with pytest.raises(ValueError, match="invalid regex"):
        split_units(model, HiFTConfig(units={"a": ["("]}))


def test_no_trainable_parameters():
    model = TinyLM().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        split_units(model)


def test_group_units_packs_consecutive_units():
    units = split_units(TinyLM(layers=4))  # n = 6
    groups = group_units(units, 4)
    assert [[u.name for u in g] for g in groups] == [
        ["embed", "layers.0", "layers.1", "layers.2"],
        ["layers.3", "head"],
    ]
    with pytest.raises(ValueError, match="number of units n=6"):
        group_units(units, 7)


def test_split_works_on_the_meta_device():
    T = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(tiny_hf_config("llama"))
    assert len(split_units(model)) == 5
