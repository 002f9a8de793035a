"""Compact fp32 masters (engine/state/compact.py): exact, and training with them equals without."""

import pytest
import torch

from hiftune import HiFTConfig, HiFTOptimizer
from hiftune.engine.state import compact
from tinymodels import TinyLM, train_steps

# fp32 bit patterns where rounding to bf16 is delicate: ties with an even and an odd high half
# (the tie that rounds down is the one 16 bits alone cannot tell apart), roundings that carry
# into the exponent (to 1.0, from the largest subnormal to the smallest normal, from the largest
# finite value to inf), subnormals, +-0, +-inf, the largest finite values, negatives of them all.
EDGES = [
    0x3F808000,  # 1 + 2**-8 exactly between two bf16 values, high half even: rounds down
    0x3F818000,  # the same with an odd high half: rounds up
    0x3F7FFFFF,  # just below 1.0: rounds up into the next exponent
    0x3F7F8000,  # a tie just below 1.0, high half odd: rounds up into the next exponent
    0x007FFFFF,  # the largest subnormal: rounds to the smallest normal
    0x00008000,  # a subnormal tie, high half even
    0x00018000,  # a subnormal tie, high half odd
    0x00000001,  # the smallest subnormal
    0x7F7F7FFF,  # the largest finite value that stays finite in bf16
    0x7F7F8000,  # a tie that rounds to inf
    0x7F7FFFFF,  # the largest finite value: rounds to inf
    0x7F800000,  # inf
    0x00000000,  # 0
    0x3F800000,  # 1.0 (low bits 0)
]


def _as_float(bits):
    signed = [b - 2**32 if b >= 2**31 else b for b in bits]
    return torch.tensor(signed, dtype=torch.int32).view(torch.float32)


def _round_trip(master):
    weight = master.to(torch.bfloat16)  # how the optimizer writes a master into its weight
    low, carry = compact.split_master(master, weight)
    return compact.join_master(weight, low, carry), low, carry


@pytest.mark.parametrize("n", [1, 8, 1001])
def test_a_master_comes_back_bit_for_bit_from_its_weight(n):
    g = torch.Generator().manual_seed(n)
    bits = torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64).tolist()
    edges = EDGES + [b | 0x80000000 for b in EDGES]
    master = _as_float(bits + edges)
    nan = master.isnan()
    back, low, carry = _round_trip(master)
    assert torch.equal(back.view(torch.int32)[~nan], master.view(torch.int32)[~nan])
    assert back[nan].isnan().all()  # bf16 keeps no NaN payload: a NaN comes back a NaN
    total = master.numel()
    assert (low.dtype, low.numel(), carry.dtype, carry.numel()) == (
        torch.int16,
        total,
        torch.uint8,
        -(-total // 8),
    )


def test_sixteen_low_bits_alone_could_not_tell_the_ties_apart():
    # Why the carry bit: both ties round to the same even bf16 value with the same low bits.
    a, b = _as_float([0x3F808000, 0x3F7F8000 + 0x10000])  # 0x3F80_8000 and 0x3F81_8000 - 2**16
    assert torch.equal(a.to(torch.bfloat16), b.to(torch.bfloat16))
    assert (a.view(torch.int32) & 0xFFFF) == (b.view(torch.int32) & 0xFFFF)
    back, _, _ = _round_trip(torch.stack([a, b]))
    assert torch.equal(back.view(torch.int32), torch.stack([a, b]).view(torch.int32))


def test_a_weight_that_is_not_the_masters_rounding_is_found():
    master = torch.randn(2, 33)
    weight = master.to(torch.bfloat16)
    assert compact.matches(master, weight)
    weight[1, 5] += 1
    assert not compact.matches(master, weight)
    assert compact.applies(master, weight)
    assert not compact.applies(master, weight.float())
    assert not compact.applies(master, weight.half())


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 200, (2, 12), generator=g) for _ in range(n)]


def _build(offload, tmp_path, compact_masters, model=None):
    torch.manual_seed(0)
    model = model if model is not None else TinyLM(vocab=200, tie=True)  # row shards, tied
    config = HiFTConfig(
        precision="bf16",
        offload=offload,
        offload_dir=str(tmp_path / f"{offload}-{compact_masters}") if offload == "disk" else None,
        compact_masters=compact_masters,
    )
    return model, HiFTOptimizer(model, torch.optim.AdamW, config, lr=1e-2)


def _masters(state):
    return [m for entry in state["groups"] for m in (entry.get("masters") or [])]


def _assert_equal_models(a, b):
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y), n


@pytest.mark.parametrize("offload", ["host", "disk", "none"])
def test_training_with_compact_masters_equals_training_without_bit_for_bit(offload, tmp_path):
    batches = _batches(7)
    model_a, opt_a = _build(offload, tmp_path, compact_masters=False)
    model_b, opt_b = _build(offload, tmp_path, compact_masters=True)
    assert train_steps(model_a, opt_a, batches) == train_steps(model_b, opt_b, batches)
    _assert_equal_models(model_a, model_b)
    state_a, state_b = opt_a.state_dict(), opt_b.state_dict()
    masters_a, masters_b = _masters(state_a), _masters(state_b)
    assert masters_a and all(m.dtype == torch.float32 for m in masters_b)  # checkpoints: whole
    assert all(torch.equal(a, b) for a, b in zip(masters_a, masters_b, strict=True))
    if offload != "disk":  # each paged-out master takes 2 bytes and 1 bit per parameter, not 4
        paged = [
            m.numel()
            for b, entry in enumerate(state_a["groups"])
            for m in entry["masters"] or []
            if b in opt_a.store
        ]
        saved = opt_a.store.resident_bytes() - opt_b.store.resident_bytes()
        assert paged and saved == sum(2 * n - -(-n // 8) for n in paged)
    opt_a.close()
    opt_b.close()
    # Handed back: the trained weights take their masters, equal with and without.
    _assert_equal_models(model_a, model_b)
    assert all(p.dtype == torch.float32 for p in model_b.parameters())


@pytest.mark.parametrize("offload", ["host", "disk"])
@pytest.mark.parametrize("weights_first", [True, False])
@pytest.mark.parametrize("saved_compact", [True, False])
def test_resuming_with_compact_masters_equals_training_on(
    offload, weights_first, saved_compact, tmp_path
):
    # A checkpoint (of a run with or without compact masters) resumes exactly, whether the
    # model's weights are loaded before the optimizer's state (the Trainer's order) or after:
    # masters that do not round to the weights they find are paged out whole.
    batches = _batches(9)
    model, opt = _build(offload, tmp_path / "a", True)
    train_steps(model, opt, batches)
    first_model, first = _build(offload, tmp_path / "b", saved_compact)
    train_steps(first_model, first, batches[:4])
    weights, state = first_model.state_dict(), first.state_dict()
    resumed_model, resumed = _build(offload, tmp_path / "c", True)
    if weights_first:
        resumed_model.load_state_dict(weights)
    resumed.load_state_dict(state)
    if not weights_first:
        resumed_model.load_state_dict(weights)
    train_steps(resumed_model, resumed, batches[4:])
    _assert_equal_models(model, resumed_model)
    masters, resumed_masters = _masters(opt.state_dict()), _masters(resumed.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(masters, resumed_masters, strict=True))


def test_a_half_precision_model_gets_its_trained_rows_back_exactly():
    # A row-sharded fp16 weight trained in bf16: handing back must not cast it to fp16 before the
    # compact masters of its other rows are rebuilt from its bf16 values, which fp16 may not
    # hold (65504, fp16's largest, is 65536 in bf16: inf in fp16).
    def trained(compact_masters):
        torch.manual_seed(0)
        model = TinyLM(vocab=200, tie=True).half()
        model.embed.weight.data[:, 0] = 65504
        config = HiFTConfig(precision="bf16", compact_masters=compact_masters)
        opt = HiFTOptimizer(model, torch.optim.AdamW, config, lr=1e-2)
        train_steps(model, opt, _batches(6))
        opt.close()
        return model

    _assert_equal_models(trained(False), trained(True))


def test_compact_masters_is_validated():
    with pytest.raises(ValueError, match="compact_masters must be True or False, got 'yes'"):
        HiFTConfig(compact_masters="yes")
