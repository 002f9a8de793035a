"""Row shards: some rows of a parameter trained by any optimizer, unchanged, as a group of their own.

The reference is HiFT written out by hand with the same split: per group, one plain optimizer over
standalone copies of the group's rows, fed with those rows of the full gradient, and the result
copied back into the weight.
"""

import copy

import pytest
import torch

from hiftune import HiFTConfig, HiFTOptimizer, split_units
from hiftune.engine.optimizers import resolve_optimizer
from hiftune.engine.shards import RowShard, take_grads
from hiftune.engine.split.units import group_units, unit_numel
from tinymodels import TinyLM, lm_loss, snapshot, tiny_hf_config, train_steps

#: TinyLM(vocab=200): its embedding (200 x 16 = 3200 parameters) is ~3 blocks (1104 each), so the
#: default budget cuts it into three row shards; tied, the LM head is the same three shards.
VOCAB = 200


def _model(tie: bool = True) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(vocab=VOCAB, tie=tie)


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (4, 12), generator=g) for _ in range(n)]


def _optimizer(name: str):
    if name == "adafactor":
        pytest.importorskip("transformers")
        return resolve_optimizer("adafactor", lr=1e-2)
    return {
        "sgd": (torch.optim.SGD, {"lr": 0.5, "momentum": 0.9}),
        "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
        "adagrad": (torch.optim.Adagrad, {"lr": 0.1}),
    }[name]


def test_the_default_split_shards_a_vocabulary_larger_than_a_block():
    model = _model()
    units = split_units(model)
    shards = [u for u in units if u.rows]
    assert [u.name for u in shards] == [
        "embed.embed.weight[0:66]",
        "embed.embed.weight[66:133]",
        "embed.embed.weight[133:200]",
    ]
    assert [u.rows["embed.weight"] for u in shards] == [(0, 66), (66, 133), (133, 200)]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    block = unit_numel(next(u for u in units if u.name == "layers.0"), shapes)
    assert max(unit_numel(u, shapes) for u in units) <= block
    # Each shard keeps the cut of the unit it was split from (the embedding's: none).
    assert {u.parent for u in shards} == {"embed"} and {u.cut for u in shards} == {0}


def naive_sharded_hift(model, optimizer_cls, kwargs, batches) -> list[float]:
    """HiFT by hand (m = 1, bottom-up) over the units of the default split, shards included."""
    named = dict(model.named_parameters())
    groups = group_units(split_units(model), 1)
    # Per group: (parameter, rows or None, the tensor its optimizer steps).
    entries = []
    for (unit,) in groups:
        group = []
        for n in unit.params:
            rows = unit.rows.get(n)
            if rows is None:
                group.append((named[n], None, named[n]))
            else:
                copy_ = named[n].detach()[rows[0] : rows[1]].clone().requires_grad_(True)
                group.append((named[n], rows, copy_))
        entries.append(group)
    optimizers = [optimizer_cls([t for _, _, t in group], **kwargs) for group in entries]
    losses = []
    for step, ids in enumerate(batches):
        active = step % len(groups)
        trained = {id(p) for p, _, _ in entries[active]}
        for p in named.values():
            p.requires_grad_(id(p) in trained)
        loss = lm_loss(model, ids)
        loss.backward()
        with torch.no_grad():
            for p, rows, t in entries[active]:
                if rows is not None:
                    t.copy_(p[rows[0] : rows[1]])
                    t.grad = p.grad[rows[0] : rows[1]].clone()
            optimizers[active].step()
            for p, rows, t in entries[active]:
                if rows is not None:
                    p[rows[0] : rows[1]].copy_(t)
        for p, _, t in entries[active]:
            p.grad = t.grad = None
        losses.append(loss.item())
    for p in named.values():
        p.requires_grad_(True)
    return losses


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("name", ["sgd", "adamw", "adagrad", "adafactor"])
def test_sharded_hift_follows_the_naive_loop(name, tie):
    optimizer_cls, kwargs = _optimizer(name)
    model = _model(tie)
    naive = copy.deepcopy(model)
    opt = HiFTOptimizer(model, optimizer_cls, HiFTConfig(offload="none"), **kwargs)
    assert any("[" in g for g in opt.group_names)
    batches = _batches(2 * opt.num_groups)  # two cycles: the shards' optimizer state is reused
    expected = naive_sharded_hift(naive, optimizer_cls, kwargs, batches)
    losses = train_steps(model, opt, batches)
    torch.testing.assert_close(losses, expected)
    want = snapshot(naive)
    for n, p in snapshot(model).items():
        torch.testing.assert_close(p, want[n], msg=n)
    # Optimizer state exists for the shard's rows only.
    sd = opt.state_dict()
    shard_state = sd["groups"][0]["optimizer"]["state"]
    for value in shard_state[0].values():
        if torch.is_tensor(value) and value.dim() == 2:
            assert value.shape == (66, 16)
        elif torch.is_tensor(value) and value.dim() == 1:  # Adafactor's factored rows/columns
            assert value.shape in {(66,), (16,)}


def test_a_single_group_with_shards_equals_the_plain_optimizer():
    model = _model()
    plain_model = copy.deepcopy(model)
    n = len(split_units(model))
    opt = HiFTOptimizer(model, torch.optim.AdamW, HiFTConfig(units_per_group=n), lr=1e-2)
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2)
    batches = _batches(4)
    train_steps(plain_model, plain, batches)
    train_steps(model, opt, batches)
    for (n, a), b in zip(model.named_parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=n)


def test_a_cycle_updates_every_row_once_and_the_tie_holds():
    model = _model()
    keys = list(model.state_dict())
    opt = HiFTOptimizer(model, torch.optim.SGD, HiFTConfig(offload="none"), lr=0.5)
    # No parameter registered in the model: the same tensors and state_dict keys.
    assert list(model.state_dict()) == keys and model.lm_head.weight is model.embed.weight
    changes = torch.zeros(VOCAB, dtype=torch.long)
    ids = torch.arange(VOCAB).reshape(10, 20)  # every row of the embedding gets a gradient
    for _ in range(opt.num_groups):
        before = model.embed.weight.detach().clone()
        lm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
        changes += (model.embed.weight != before).any(dim=1)
    assert changes.tolist() == [1] * VOCAB
    assert model.lm_head.weight is model.embed.weight


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_mid_cycle_with_shards_is_bit_identical(tmp_path, precision):
    def make(order):
        model = _model()
        config = HiFTConfig(order=order, seed=4, precision=precision)
        opt = HiFTOptimizer(model, torch.optim.AdamW, config, lr=1e-2)
        return model, opt

    batches = _batches(14)
    model, opt = make("random")
    train_steps(model, opt, batches)
    opt.close()  # in bf16: the weights take their fp32 masters back
    reference = snapshot(model)

    model, opt = make("random")
    train_steps(model, opt, batches[:5])
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    opt.close()

    model, opt = make("bottom2up")  # the checkpoint brings its order back
    ckpt = torch.load(path, weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    train_steps(model, opt, batches[5:])
    opt.close()
    for n, p in snapshot(model).items():
        assert torch.equal(p, reference[n]), n


def test_a_checkpoint_of_another_split_is_refused():
    model = _model()
    saved = HiFTOptimizer(model, torch.optim.AdamW, HiFTConfig(max_unit_params=1000), lr=1e-2)
    sd = saved.state_dict()
    saved.close()
    opt = HiFTOptimizer(model, torch.optim.AdamW, lr=1e-2)
    with pytest.raises(ValueError, match="different model or unit split"):
        opt.load_state_dict(sd)


def test_bf16_masters_cover_the_rows_and_close_gives_them_back():
    model = _model()
    opt = HiFTOptimizer(model, torch.optim.SGD, HiFTConfig(precision="bf16"), lr=0.5)
    assert model.embed.weight.dtype == torch.bfloat16 and model.lm_head.weight is model.embed.weight
    train_steps(model, opt, _batches(opt.num_groups))
    sd = opt.state_dict()
    rows = [sd["groups"][b]["masters"][0] for b in range(3)]
    assert [tuple(m.shape) for m in rows] == [(66, 16), (67, 16), (67, 16)]
    opt.close()
    assert model.embed.weight.dtype == torch.float32 and model.lm_head.weight is model.embed.weight
    assert torch.equal(model.embed.weight.detach(), torch.cat(rows))  # fp32 masters, not bf16


def test_take_grads_gives_each_shard_its_rows_and_frees_the_full_gradient():
    weight = torch.nn.Parameter(torch.arange(12.0).reshape(6, 2))
    weight.grad = torch.arange(12.0).reshape(6, 2) * 10
    full = weight.grad.clone()
    shards = [RowShard(weight, 0, 2), RowShard(weight, 2, 6)]
    take_grads(shards)
    assert weight.grad is None
    assert torch.equal(shards[0].param.grad, full[0:2]) and torch.equal(
        shards[1].param.grad, full[2:]
    )
    # The view follows the weight's data when it is replaced (mixed precision casts it).
    weight.data = weight.data.to(torch.bfloat16)
    shards[1].attach()
    assert shards[1].param.dtype == torch.bfloat16
    assert shards[1].param.data_ptr() == weight.data[2:].data_ptr()
    shards[1].release()
    assert shards[1].param.numel() == 0


def test_save_pretrained_round_trips_with_sharded_vocabulary(tmp_path):
    T = pytest.importorskip("transformers")
    config = tiny_hf_config("llama")
    config.vocab_size = 512  # 512 x 16: larger than a block, so sharded
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config)
    keys = list(model.state_dict())
    opt = HiFTOptimizer(model, torch.optim.AdamW, lr=1e-2)
    assert any(u.rows for u in opt.units)
    ids = torch.randint(0, 512, (2, 8))
    for _ in range(opt.num_groups):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    opt.close()
    assert list(model.state_dict()) == keys
    model.save_pretrained(tmp_path)
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert list(loaded.state_dict()) == keys
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
