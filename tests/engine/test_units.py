"""The unit split: Hugging Face families (skipped without transformers), custom stacks, overrides."""

import copy

import pytest
import torch
from torch import nn

from hiftune import HiFTConfig, HiFTOptimizer, split_units
from hiftune.engine import trace
from hiftune.engine.units import find_blocks, group_units
from tinymodels import SharedBiasLM, TinyLM, tiny_auto_model, tiny_hf_config, train_steps

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


# --- units by execution -------------------------------------------------------------------------


def test_modules_registered_after_the_blocks_but_used_before_them_open_the_model():
    torch.manual_seed(0)
    model = SharedBiasLM()
    units = split_units(model)
    _check_partition(model, units)
    assert [u.name for u in units] == ["embed", "layers.0", "layers.1", "layers.2", "head"]
    assert set(units[0].params) == {
        "embed.weight",
        "embed_norm.weight",
        "embed_norm.bias",
        "bias.weight",
    }
    assert units[-1].params == ("lm_head.weight",) and units[-1].cut == 3
    # With the hooks in place (and a grad-requiring embedding output, as gradient checkpointing
    # makes it) one cycle updates every parameter, the shared bias table included.
    model.embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    opt = HiFTOptimizer(model, torch.optim.SGD, HiFTConfig(offload="none"), lr=0.5)
    before = copy.deepcopy(model.state_dict())
    train_steps(model, opt, [torch.randint(0, 32, (2, 8))] * opt.num_groups)
    assert [n for n, p in model.state_dict().items() if torch.equal(before[n], p)] == []


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_encoder_decoder_blocks_are_units_in_execution_order(model_type):
    pytest.importorskip("transformers")
    model = tiny_auto_model(model_type, "seq2seq-lm")
    units = split_units(model)
    _check_partition(model, units)
    names = [u.name for u in units]
    assert names == ["embed", "layers.0", "layers.1", "between.2", "layers.2", "layers.3", "head"]
    modules = [u.module for u in units if u.module is not None]
    assert ["decoder" in m for m in modules] == [False, False, True, True]
    # Cuts: between the stacks only the encoder blocks may be detached, above all four.
    assert [u.cut for u in units] == [0, 1, 2, 2, 3, 4, 4]
    if model_type == "bart":
        # Registered after the encoder layers, used before them: with the embedding.
        assert "model.encoder.layernorm_embedding.weight" in units[0].params
        assert "model.decoder.layernorm_embedding.weight" in units[3].params
    # The same split on the meta device (what the memory estimator sees).
    with torch.device("meta"):
        meta = tiny_auto_model(model_type, "seq2seq-lm")
    assert split_units(meta) == units


def test_tracing_leaves_the_model_as_it_was(monkeypatch):
    model = TinyLM()
    model.train()
    model.blocks[1].eval()
    flags = [m.training for m in model.modules()]
    weights = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    paths = [f"blocks.{i}" for i in range(4)]
    # On a meta copy: the model itself is never called.
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    meta_trace = trace.trace_forward(model, paths)
    assert meta_trace is not None and meta_trace.device == "meta" and calls == []
    # In place (as when the model cannot run on meta): eval mode during the pass, then the
    # training flags, weights, RNG and hooks as before.
    monkeypatch.setattr(trace, "_run_on_meta_copy", lambda *a: None)
    modes = []
    model.blocks[0].register_forward_hook(lambda m, a, out: modes.append(m.training))
    real = trace.trace_forward(model, paths)
    assert real is not None and real.device == "cpu" and calls == [1] and modes == [False]
    assert real.blocks == meta_trace.blocks == tuple(paths)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(weights[n], p) for n, p in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    assert hooks == 2  # the test's own two


def test_a_model_that_cannot_run_is_split_by_registration_without_cuts_outside_blocks():
    model = TinyLM()
    model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no dummy input"))
    units = split_units(model)
    assert [u.name for u in units] == [
        "embed",
        "layers.0",
        "layers.1",
        "layers.2",
        "layers.3",
        "head",
    ]
    # Block parameters run inside their block; where the rest runs is unknown: no cut.
    assert [u.cut for u in units] == [0, 1, 2, 3, 4, 0]
