"""The unit split: Hugging Face families (skipped without transformers), custom stacks, overrides."""

import copy
import itertools

import pytest
import torch
from torch import nn

from hiftune import HiFTConfig, HiFTOptimizer, split_units
from hiftune.engine.split import trace
from hiftune.engine.split.subunits import row_shards
from hiftune.engine.split.units import Unit, balanced_bounds, find_blocks, group_units, unit_numel
from tinymodels import (
    Block,
    SharedBiasLM,
    TinyLM,
    lm_loss,
    tiny_auto_model,
    tiny_hf_config,
    train_steps,
)

FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "gpt_neo", "opt", "bert", "roberta"]

#: The paper's split: no unit budget, so a unit is never smaller than a block. (TinyLM's embedding
#: unit, 1536 parameters, is larger than its blocks, 1104: the default would split it.)
PAPER = HiFTConfig(max_unit_params=None)


def _check_rows(model: nn.Module, units) -> None:
    """Every row of every trainable parameter sits in exactly one unit."""
    rows: dict[str, list[tuple[int, int]]] = {}
    named = dict(model.named_parameters())
    for u in units:
        for n in u.params:
            rows.setdefault(n, []).append(u.rows.get(n, (0, named[n].shape[0])))
    assert set(rows) == {n for n, p in named.items() if p.requires_grad}
    for n, ranges in rows.items():
        flat = [i for a, b in sorted(ranges) for i in range(a, b)]
        assert flat == list(range(named[n].shape[0])), n


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
    units = split_units(model, PAPER)
    assert [u.name for u in units] == ["embed"] + [f"layers.{i}" for i in range(5)] + ["head"]
    assert units[0].params == ("embed.weight", "pos.weight")
    assert [u.module for u in units[1:-1]] == [f"blocks.{i}" for i in range(5)]

    seq = nn.Sequential(nn.Embedding(10, 8), *[nn.Linear(8, 8) for _ in range(3)], nn.LayerNorm(8))
    units = split_units(seq, PAPER)
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
    units = split_units(model, HiFTConfig(blocks="blocks", max_unit_params=None))
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
    units = split_units(TinyLM(layers=4), PAPER)  # n = 6
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
    units = split_units(model, PAPER)
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
    # makes it) one cycle updates every parameter, the shared bias table included; by default
    # the embedding unit (larger than a block) is split, each piece keeping its cut.
    assert [u.cut for u in split_units(model) if u.parent == "embed"] == [0, 0]
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
    units = split_units(model, PAPER)
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


# --- units over the size budget -----------------------------------------------------------------


def test_a_block_over_budget_is_split_into_its_children_in_execution_order():
    T = pytest.importorskip("transformers")
    model = T.AutoModelForCausalLM.from_config(tiny_hf_config("llama"))
    # A Llama block registers self_attn, mlp, input_layernorm, post_attention_layernorm, but runs
    # input_layernorm, self_attn (768), post_attention_layernorm, mlp (3 x 512) in that order.
    units = split_units(model, HiFTConfig(max_unit_params=1000))
    _check_rows(model, units)
    layer = [u for u in units if u.parent == "layers.1"]
    assert [u.name for u in layer] == [
        "layers.1.input_layernorm+self_attn+post_attention_layernorm",
        "layers.1.mlp.gate_proj",
        "layers.1.mlp.up_proj",
        "layers.1.mlp.down_proj",
    ]
    assert {u.module for u in layer} == {"model.layers.1"} and {u.cut for u in layer} == {2}
    assert layer[0].params[:2] == (
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.self_attn.q_proj.weight",
    )
    # The 64 x 16 embedding and LM head: two row shards each; the final norm joins the first.
    assert [u.name for u in units if u.parent in ("embed", "head")] == [
        "embed[0:32]",
        "embed[32:64]",
        "head.model.norm.weight+lm_head.weight[0:32]",
        "head.lm_head.weight[32:64]",
    ]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert max(unit_numel(u, shapes) for u in units) <= 1000


def test_experts_are_sub_units_and_a_budget_of_none_is_the_paper_split():
    pytest.importorskip("transformers")
    model = tiny_auto_model("mixtral")  # 2 experts of 3 x 32 x 64 per block
    names = [u.name for u in split_units(model, HiFTConfig(max_unit_params=7000))]
    assert "layers.0.mlp.experts" not in names and any(".mlp.experts." in n for n in names)
    assert [u.name for u in split_units(model, HiFTConfig(max_unit_params=None))] == [
        "embed",
        "layers.0",
        "layers.1",
        "head",
    ]


def test_auto_leaves_an_override_alone_and_a_number_splits_it():
    model = TinyLM(layers=2)
    units = {"all": [r".*"]}
    assert [u.name for u in split_units(model, HiFTConfig(units=units))] == ["all"]
    split = split_units(model, HiFTConfig(units=units, max_unit_params=1200))
    _check_partition(model, split)
    # Parameters packed in registration order while they fit 1200: embedding (512), positions
    # (1024) with the first norm (32), ...
    assert [u.name for u in split][:2] == [
        "all.embed.weight",
        "all.pos.weight+blocks.0.norm.weight+blocks.0.norm.bias",
    ]
    assert all(u.parent == "all" and u.cut == 0 and not u.rows for u in split)


@pytest.mark.parametrize(
    ("rows", "row", "budget", "expected"),
    [
        (10, 3, 7, [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]),  # 2 rows of 3 fit in 7
        (10, 3, 9, [(0, 2), (2, 5), (5, 7), (7, 10)]),  # 3 rows fit: 4 shards of 2 or 3 rows
        (5, 100, 10, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]),  # a row over budget: one each
        (49152, 576, 3_540_096, [(i * 6144, (i + 1) * 6144) for i in range(8)]),  # SmolLM2
    ],
)
def test_row_shards(rows, row, budget, expected):
    assert row_shards(rows, row, budget) == expected


@pytest.mark.parametrize(
    ("sizes", "k", "expected"),
    [
        ([5, 1, 1, 1, 5, 1, 1, 1], 3, [0, 3, 6, 8]),  # 7, 7, 2: no split keeps all at 6
        ([10, 1, 1, 1, 1], 3, [0, 1, 4, 5]),  # the big one alone; the rest filled from the left
        ([1, 2, 3, 4, 5], 2, [0, 3, 5]),  # 6 and 9: the best bound is 9
        ([1, 2, 3, 4, 5], 5, [0, 1, 2, 3, 4, 5]),
        ([4, 4, 4, 4], 1, [0, 4]),
        ([3, 0, 0, 3], 2, [0, 3, 4]),  # empty units go with the run before
    ],
)
def test_balanced_bounds_are_the_exact_linear_partition(sizes, k, expected):
    assert balanced_bounds(sizes, k) == expected
    best = max(sum(sizes[a:b]) for a, b in itertools.pairwise(expected))
    # Against every split of n items into k runs (n is small): none has a smaller largest run.
    n = len(sizes)
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = [0, *cuts, n]
        assert max(sum(sizes[a:b]) for a, b in itertools.pairwise(bounds)) >= best


def test_group_by_size_balances_the_same_number_of_groups():
    units = [Unit(f"u{i}", (f"p{i}",)) for i in range(6)]
    sizes = [9, 1, 1, 1, 1, 9]
    by_count = group_units(units, 2, "count", sizes)
    by_size = group_units(units, 2, "size", sizes)
    assert [[u.name for u in g] for g in by_count] == [["u0", "u1"], ["u2", "u3"], ["u4", "u5"]]
    assert [[u.name for u in g] for g in by_size] == [["u0"], ["u1", "u2", "u3", "u4"], ["u5"]]
    with pytest.raises(ValueError, match="needs one size per unit"):
        group_units(units, 2, "size")
    with pytest.raises(ValueError, match="group_by must be one of count, size"):
        group_units(units, 2, "bytes", sizes)
    with pytest.raises(ValueError, match="sizes must be >= 0"):
        balanced_bounds([1, -1], 1)
    with pytest.raises(ValueError, match="cannot split 2 units into 3"):
        balanced_bounds([1, 1], 3)


def test_group_by_size_trains_like_count_with_its_own_groups(batches):
    model = TinyLM()
    config = HiFTConfig(units_per_group=3, group_by="size", offload="none", max_unit_params=None)
    opt = HiFTOptimizer(model, torch.optim.SGD, config, lr=0.1)
    # Units: embed 1536, four blocks of 1104, head 560 -> k = 2: the balanced cut is 3 | 3.
    assert opt.group_names == ["embed..layers.1", "layers.2..head"]
    before = copy.deepcopy(model.state_dict())
    train_steps(model, opt, batches[:2])
    assert [n for n, p in model.state_dict().items() if torch.equal(before[n], p)] == []


class _SharedLayerLM(nn.Module):
    """ALBERT's shape: one layer, alone in a ModuleList, called at every depth."""

    def __init__(self, vocab: int = 32, d: int = 16, depth: int = 3) -> None:
        from tinymodels import Block

        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d)])
        self.depth = depth
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for _ in range(self.depth):
            x = self.layers[0](x)
        return self.lm_head(x)


def test_a_lone_layer_called_at_every_depth_is_one_block(batches):
    from tinymodels import lm_loss

    torch.manual_seed(0)
    model = _SharedLayerLM()
    units = split_units(model, PAPER)
    # The layer whole, not the two Linear modules of its feed-forward taken for two blocks.
    assert [u.name for u in units] == ["embed", "layers.0", "head"]
    assert units[1].module == "layers.0"
    assert set(units[1].params) == {
        n for n, _ in model.named_parameters() if n.startswith("layers.")
    }
    # The layer runs again after its weights are first used (no cut for it); the head runs
    # after its every call.
    assert [u.cut for u in units] == [0, 0, 1]
    # Each group's gradient is the plain backward's for the same weights, although the
    # embedding output requires grad (as with gradient checkpointing): truncation cuts no call.
    plain = copy.deepcopy(model)
    model.embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    opt = HiFTOptimizer(
        model, torch.optim.SGD, HiFTConfig(offload="none", max_unit_params=None), lr=0.5
    )
    before = copy.deepcopy(model.state_dict())
    for ids in batches[: opt.num_groups]:
        plain.load_state_dict(model.state_dict())
        plain.zero_grad()
        lm_loss(plain, ids).backward()
        lm_loss(model, ids).backward()
        active = {n: p for n, p in model.named_parameters() if p.requires_grad}
        reference = dict(plain.named_parameters())
        assert active and all(torch.allclose(p.grad, reference[n].grad) for n, p in active.items())
        opt.step()
        opt.zero_grad()
    assert [n for n, p in model.state_dict().items() if torch.equal(before[n], p)] == []


def test_albert_shared_layer_is_one_unit():
    pytest.importorskip("transformers")
    model = tiny_auto_model("albert", "masked-lm")
    units = split_units(model, PAPER)
    assert [u.name for u in units] == ["embed", "layers.0", "head"]
    layer = model.get_submodule(units[1].module)
    assert {id(p) for p in layer.parameters()} == {
        id(p) for n, p in model.named_parameters() if n in units[1].params
    }
    # The projection into the layers' width runs before them: with the embedding.
    assert "albert.encoder.embedding_hidden_mapping_in.weight" in units[0].params


class _UnusedTableLM(nn.Module):
    """A big table the forward never uses (a vision path of a text-only run), beside the blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.unused = nn.Linear(16, 256)  # 4,352 parameters, far over a block's 1,616
        self.blocks = nn.ModuleList(Block(16) for _ in range(2))
        self.lm_head = nn.Linear(16, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)


def test_unused_parameters_ride_with_a_used_piece():
    # Split alone into shards, the unused table would make groups whose step has no gradient
    # path to the loss at all: backward() would raise.
    model = _UnusedTableLM()
    units = split_units(model, HiFTConfig())
    holders = [u for u in units if "unused.weight" in u.params]
    assert len(holders) == 1 and "unused.weight" not in holders[0].rows  # whole, once
    assert "embed.weight" in holders[0].params or "lm_head.weight" in holders[0].params
    opt = HiFTOptimizer(model, torch.optim.SGD, HiFTConfig(units_per_group=1), lr=0.1)
    ids = torch.randint(0, 32, (2, 8))
    for _ in range(opt.num_groups):  # every step has something to train
        lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
    opt.close()


def test_a_whole_module_list_of_layers_is_a_stack_whatever_its_class_and_name():
    # A speech encoder (wav2vec2: encoder.layers, Wav2Vec2EncoderLayer) before a text decoder
    # (BERT: encoder.layer, BertLayer): two classes, two container names, neither in the other's
    # _no_split_modules; both are stacks, in the order they run.
    T = pytest.importorskip("transformers")
    from tinymodels import tiny_auto_model

    model = tiny_auto_model("speech-encoder-decoder", "speech-seq2seq")
    assert isinstance(model, T.SpeechEncoderDecoderModel)
    units = split_units(model, HiFTConfig(max_unit_params=None))
    blocks = [u.module for u in units if u.module is not None]
    assert blocks == [
        "encoder.encoder.layers.0",
        "encoder.encoder.layers.1",
        "decoder.bert.encoder.layer.0",
        "decoder.bert.encoder.layer.1",
    ]
