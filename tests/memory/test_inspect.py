"""Tests of ``hiftune inspect``: the unit split, groups, sizes and warnings before training."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from hiftune import HiFTConfig
from hiftune.cli import main
from hiftune.engine.split.units import Unit
from hiftune.errors import UserError
from hiftune.memory import gradient_check
from hiftune.memory import inspect as inspect_module
from hiftune.memory.estimate import build_meta_model
from hiftune.memory.gradient_check import FULL
from hiftune.memory.inspect import inspect_split


def _llama(tmp_path, vocab: int = 64, tie: bool = False):
    """A 3-block Llama config.json; its embedding is ``vocab * 16`` against ~2.3k per block."""
    config = {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "tie_word_embeddings": tie,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_counts_match_named_parameters_with_a_tied_tensor_once(tmp_path):
    model = build_meta_model(_llama(tmp_path, tie=True))
    result = inspect_split(model, units_per_group=2, precision="bf16")
    trainable = sum(p.numel() for p in model.parameters())  # tied: listed once
    assert result.trainable_params == result.params == trainable
    assert sum(g.params for g in result.groups) == trainable
    assert sum(u.params for u in result.units) == trainable
    assert all(g.bytes == 2 * g.params for g in result.groups)  # bf16: 2 bytes per weight
    assert result.tied == [["model.embed_tokens.weight", "lm_head.weight"]]
    # Every unit appears in exactly one group.
    assert sorted(n for g in result.groups for n in g.units) == sorted(u.name for u in result.units)


def test_frozen_parameters_are_not_counted_as_trainable_and_stay_frozen(tmp_path):
    model = build_meta_model(_llama(tmp_path))
    model.model.norm.weight.requires_grad_(False)
    result = inspect_split(model)
    assert result.trainable_params == result.params - 16
    assert sum(g.params for g in result.groups) == result.trainable_params
    assert not model.model.norm.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "model.norm.weight")


def test_groups_follow_the_training_order_and_the_peak_is_the_largest(tmp_path):
    model = build_meta_model(_llama(tmp_path))
    up = inspect_split(model, check_gradients=False)
    down = inspect_split(model, order="top2down", check_gradients=False)
    assert [g.name for g in down.groups] == [g.name for g in reversed(up.groups)]
    assert [g.step for g in down.groups] == list(range(1, len(down.groups) + 1))
    largest = max(up.groups, key=lambda g: g.params)
    assert up.peak_group == down.peak_group == largest.name
    assert up.median_block_params == up.units[1].params  # three identical blocks


def test_a_vocabulary_far_larger_than_a_block_warns(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    small = inspect_split(build_meta_model(_llama(tmp_path / "a", vocab=64)))
    assert small.warnings == []
    paper = HiFTConfig(max_unit_params=None)  # the paper's split: a vocabulary is one unit
    big = inspect_split(build_meta_model(_llama(tmp_path / "b", vocab=4096)), config=paper)
    assert big.groups[0].name == "embed" and big.groups[0].params == 4096 * 16
    assert max(g.params for g in big.groups) == big.groups[-1].params  # LM head + final norm
    assert big.peak_group == big.groups[-1].name
    assert any(w.startswith("unit embed has") and "median block" in w for w in big.warnings)
    assert any(w.startswith("unit head has") for w in big.warnings)  # untied LM head, too
    # The default split shards both (4096 x 16 = 65536 parameters) into units within a block.
    split = inspect_split(build_meta_model(_llama(tmp_path / "b", vocab=4096)))
    assert split.warnings == []
    block = split.median_block_params
    shards = [u for u in split.units if u.rows]
    assert {u.parent for u in shards} == {"embed", "head"} and max(
        u.params for u in shards
    ) <= block
    assert shards[0].name == "embed[0:141]" and shards[0].rows == {
        "model.embed_tokens.weight": [0, 141]
    }
    rows = [r for u in shards for r in u.rows.values()]
    assert sum(stop - start for start, stop in rows) == 2 * 4096  # every row once, in two tensors
    assert max(g.params for g in split.groups) == block


def test_a_unit_holding_several_blocks_warns(tmp_path):
    model = build_meta_model(_llama(tmp_path))
    override = {
        "embed": [r"model\.embed_tokens\..*"],
        "two": [r"model\.layers\.[01]\..*"],
        "rest": [r"model\.layers\.2\..*", r"model\.norm\..*", r"lm_head\..*"],
    }
    result = inspect_split(model, config=HiFTConfig(units=override))
    assert any(w.startswith("unit two holds 2 blocks") for w in result.warnings)
    assert not any(w.startswith("unit rest holds") for w in result.warnings)


class _PreNormLM(nn.Module):
    """A norm registered after the blocks but applied before them (BART's embedding norm)."""

    def __init__(self, vocab: int = 32, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(3))
        self.pre_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.unused = nn.Linear(d, d)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(self.embed(input_ids))
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x).float().sum()


def _block_units(*params: str) -> list[Unit]:
    """Units ``layers.i`` of the modules ``blocks.i`` holding ``blocks.i.<param>``."""
    return [
        Unit(f"layers.{i}", tuple(f"blocks.{i}.{p}" for p in params), f"blocks.{i}")
        for i in range(3)
    ]


class _CutEveryBlock:
    """A backward truncation that detaches every block input whatever the group (the paper's cut
    for a head group): the checker must report what it cuts off, whatever the engine does."""

    def __init__(self, model: nn.Module, units) -> None:
        self.on = False
        self.handles = [
            model.get_submodule(u.module).register_forward_pre_hook(self._hook)
            for u in units
            if u.module is not None
        ]

    def _hook(self, module, args):
        return tuple(a.detach() for a in args) if self.on else None

    def set_active(self, units) -> None:
        self.on = any(u.name == "head" for u in units)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def test_parameters_backward_truncation_cuts_off_are_reported(monkeypatch):
    with torch.device("meta"):
        model = _PreNormLM()
    blocks = _block_units("weight", "bias")
    head = Unit("head", ("pre_norm.weight", "pre_norm.bias", "head.weight", "head.bias"))
    unused = Unit("unused", ("unused.weight", "unused.bias"))
    split = [Unit("embed", ("embed.weight",)), *blocks, head, unused]
    monkeypatch.setattr(inspect_module, "split_units", lambda model, config: split)
    monkeypatch.setattr(gradient_check, "BackwardTruncation", _CutEveryBlock)
    result = inspect_split(model)
    # The head group trains with every block input detached, so pre_norm never learns.
    assert result.no_gradient == {
        FULL: ["unused.weight", "unused.bias"],
        "head": ["pre_norm.weight", "pre_norm.bias"],
    }
    assert any("when their group head trains" in w for w in result.warnings)
    assert any("even when everything trains" in w for w in result.warnings)
    assert all(p.requires_grad for p in model.parameters())  # flags restored

    # In a unit before the blocks it is never cut off.
    split[0] = Unit("embed", ("embed.weight", "pre_norm.weight", "pre_norm.bias"))
    split[4] = Unit("head", ("head.weight", "head.bias"))
    assert inspect_split(model).no_gradient == {FULL: ["unused.weight", "unused.bias"]}


def test_the_engines_split_leaves_no_parameter_without_a_gradient(tmp_path):
    # A norm that BART registers after its blocks but runs before them, and cross-attention that
    # a decoder-only BART never runs (the one finding here that is not HiFT's doing).
    config = {
        "model_type": "bart",
        "vocab_size": 64,
        "d_model": 16,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 32,
        "decoder_ffn_dim": 32,
        "max_position_embeddings": 32,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = inspect_split(build_meta_model(str(tmp_path)))
    assert list(result.no_gradient) == [FULL]
    assert all(".encoder_attn" in n for n in result.no_gradient[FULL])


class _SharedTableLM(nn.Module):
    """Every block calls one table module (registered in each, so also tied under three names)."""

    def __init__(self, vocab: int = 32, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        table = nn.Linear(d, d)
        self.blocks = nn.ModuleList(_TableBlock(d, table) for _ in range(3))
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x).float().sum()


class _TableBlock(nn.Module):
    def __init__(self, d: int, table: nn.Linear) -> None:
        super().__init__()
        self.ff = nn.Linear(d, d)
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ff(x) + self.table(x)


def test_a_table_every_block_uses_is_shared_and_tied(monkeypatch):
    with torch.device("meta"):
        model = _SharedTableLM()
    blocks = _block_units("ff.weight", "ff.bias")
    table = ("blocks.0.table.weight", "blocks.0.table.bias")
    head = Unit("head", ("head.weight", "head.bias"))
    split = [Unit("embed", ("embed.weight", *table)), *blocks, head]
    monkeypatch.setattr(inspect_module, "split_units", lambda model, config: split)
    result = inspect_split(model)
    assert result.shared == {n: ["layers.0", "layers.1", "layers.2"] for n in table}
    assert [f"blocks.{i}.table.weight" for i in range(3)] in result.tied
    assert result.no_gradient == {}


def test_bad_precision_and_m_are_user_errors(tmp_path):
    model = build_meta_model(_llama(tmp_path))
    with pytest.raises(UserError, match="precision"):
        inspect_split(model, precision="fp8")
    with pytest.raises(UserError, match="units_per_group"):
        inspect_split(model, units_per_group=99)


def test_cli_json_parses(tmp_path, capsys):
    path = _llama(tmp_path, vocab=4096, tie=True)
    assert main(["inspect", path, "--json", "-m", "2", "--precision", "fp16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["units_per_group"] == 2 and out["bytes_per_param"] == 2
    # The tied 4096 x 16 embedding is in 29 row shards (141 or 142 rows, within a block of 2336
    # parameters), two to a group: the peak is a pair of blocks, no longer the embedding.
    assert out["peak_group"] == "layers.1..layers.2"
    assert out["tied"] == [["model.embed_tokens.weight", "lm_head.weight"]]
    assert [g["step"] for g in out["groups"]] == list(range(1, len(out["groups"]) + 1))
    assert not any("unit embed has" in w for w in out["warnings"])


def test_cli_table(tmp_path, capsys):
    argv = ["inspect", _llama(tmp_path), "--task", "seq-cls", "--no-grad-check", "-m", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "LlamaForSequenceClassification" in out
    assert "| 2 | layers.0 | layers.0 | model.layers.0 |" in out
    assert "Peak group: layers.0" in out and "No warnings." in out


@pytest.mark.parametrize(
    "argv",
    [["inspect", "no/such/config.json"], ["inspect", "gpt2", "-m", "99"]],
)
def test_cli_user_errors_are_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hiftune inspect: error:")


def test_an_encoder_decoder_classifier_runs_the_gradient_check(tmp_path):
    # T5's classification head pools at the end-of-sequence token: the dummy batch must hold one.
    config = {
        "model_type": "t5",
        "vocab_size": 64,
        "d_model": 16,
        "d_kv": 8,
        "d_ff": 32,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 2,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = inspect_split(build_meta_model(str(tmp_path), task="seq-cls"), head="seq-cls")
    assert not any("gradient check skipped" in w for w in result.warnings), result.warnings
    assert result.tied == [
        [
            f"transformer.{n}.weight"
            for n in ("shared", "encoder.embed_tokens", "decoder.embed_tokens")
        ]
    ]


def test_sub_units_keep_their_block_in_the_gradient_check(tmp_path):
    # A budget below a block: attention and MLP projections become sub-units of their block;
    # every parameter still gets its gradient, and the shared/no-gradient check sees blocks.
    model = build_meta_model(_llama(tmp_path))
    result = inspect_split(model, config=HiFTConfig(max_unit_params=1000))
    assert result.warnings == [] and result.no_gradient == {}
    layer = [u for u in result.units if u.parent == "layers.0"]
    assert [u.name for u in layer][-1] == "layers.0.mlp.down_proj"
    assert {u.module for u in layer} == {"model.layers.0"}
    assert sum(u.params for u in result.units) == result.trainable_params == result.params


#: Head -> its tiny model's units (name, block module) in execution order: the encoder's blocks,
#: what runs between the stacks, then the decoder's (the vision tower before the LLM for LLaVA).
SPLITS = {
    "seq2seq-lm": [
        ("embed", None),
        ("layers.0", "encoder.block.0"),
        ("layers.1", "encoder.block.1"),
        ("between.2", None),
        ("layers.2", "decoder.block.0"),
        ("layers.3", "decoder.block.1"),
        ("head", None),
    ],
    "speech-seq2seq": [
        ("embed", None),
        ("layers.0", "model.encoder.layers.0"),
        ("layers.1", "model.encoder.layers.1"),
        ("between.2", None),
        ("layers.2", "model.decoder.layers.0"),
        ("layers.3", "model.decoder.layers.1"),
        ("head", None),
    ],
    "image-cls": [
        ("embed", None),
        ("layers.0", "vit.layers.0"),
        ("layers.1", "vit.layers.1"),
        ("head", None),
    ],
    "ctc": [
        ("embed", None),
        ("layers.0", "wav2vec2.encoder.layers.0"),
        ("layers.1", "wav2vec2.encoder.layers.1"),
        ("layers.2", "wav2vec2.encoder.layers.2"),
        ("head", None),
    ],
    "image-text-to-text": [
        ("embed", None),
        ("layers.0", "model.vision_tower.encoder.layers.0"),
        ("layers.1", "model.vision_tower.encoder.layers.1"),
        ("between.2", None),
        ("layers.2", "model.language_model.layers.0"),
        ("layers.3", "model.language_model.layers.1"),
        ("head", None),
    ],
}


@pytest.mark.parametrize("head", sorted(SPLITS))
def test_every_head_splits_in_execution_order_from_a_config_file(tmp_path, head):
    from tinymodels import tiny_head_config

    tiny_head_config(head).save_pretrained(tmp_path)
    model = build_meta_model(str(tmp_path), task=head)
    result = inspect_split(model, head=head, config=HiFTConfig(max_unit_params=None))
    assert [(u.name, u.module) for u in result.units] == SPLITS[head]
    assert not any("gradient check skipped" in w for w in result.warnings), result.warnings
    if head == "image-text-to-text":  # LLaVA never uses it (tests/memory/test_gradient_check.py)
        norm = "model.vision_tower.post_layernorm"
        assert result.no_gradient == {FULL: [f"{norm}.weight", f"{norm}.bias"]}
    else:
        assert result.no_gradient == {} and result.warnings == []


def test_the_embedding_of_a_decoder_after_a_vision_tower_has_its_own_gradient(tmp_path):
    # The default split cuts LLaVA's embedding unit in two (vision patches, text tokens): each
    # half trains when its group does, although the text embedding runs after the vision tower.
    from tinymodels import tiny_head_config

    tiny_head_config("image-text-to-text").save_pretrained(tmp_path)
    model = build_meta_model(str(tmp_path), task="image-text-to-text")
    result = inspect_split(model, head="image-text-to-text")
    assert [u.name for u in result.units][:2] == [
        "embed.model.vision_tower.embeddings.class_embedding+...+model.vision_tower.pre_layrnorm.bias",
        "embed.model.language_model.embed_tokens.weight",
    ]
    assert list(result.no_gradient) == [FULL]


def test_a_head_the_architecture_lacks_fails_before_the_split(tmp_path):
    from tinymodels import tiny_head_config

    tiny_head_config("image-cls").save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"its heads: image-cls$"):
        build_meta_model(str(tmp_path), task="speech-seq2seq")
