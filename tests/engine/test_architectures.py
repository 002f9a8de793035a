"""The unit split across ``transformers`` architectures: tiny models from their default configs.

For each architecture (decoder LLMs incl. mixtures of experts, encoders, encoder-decoders), with
m = 1: every trainable parameter is in exactly one group, no group holds two blocks, every block
of every stack is a unit, one cycle updates every parameter the loss reaches exactly once, frozen
blocks below the active one build no graph (even with a grad-requiring embedding output, as
gradient checkpointing makes it), and a single group equals the plain optimizer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hiftune import HiFTConfig, HiFTOptimizer, split_units
from tinymodels import tiny_auto_model

#: (model_type, head, number of blocks over all stacks).
ARCHS = [
    *(
        (t, "causal-lm", 2)
        for t in (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "phi",
            "phi3",
            "gpt2",
            "gpt_neo",
            "gpt_neox",
            "gptj",
            "opt",
            "bloom",
            "falcon",
            "stablelm",
            "starcoder2",
            "olmo",
            "granite",
            "mixtral",
            "qwen2_moe",
            "olmo_hybrid",  # attention and linear-attention layers in one list
        )
    ),
    *(
        (t, "masked-lm", 2)
        for t in ("bert", "roberta", "roberta-prelayernorm", "distilbert", "electra")
    ),
    ("bert", "seq-cls", 2),
    *((t, "seq2seq-lm", 4) for t in ("t5", "mt5", "bart", "mbart", "pegasus", "marian")),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices: on a shared machine, torch's thread pool costs ~100x the arithmetic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(model: nn.Module, head: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (2, 8), generator=g)
    if head == "seq-cls":
        return {"input_ids": ids, "labels": torch.tensor([0, 2])}
    return {"input_ids": ids, "labels": ids}


def _first_tensor(out: object) -> torch.Tensor | None:
    if torch.is_tensor(out):
        return out
    if isinstance(out, tuple | list) and out and torch.is_tensor(out[0]):
        return out[0]
    return None


def _reached(model: nn.Module, batch: dict[str, torch.Tensor]) -> set[str]:
    """Names of the parameters the loss gives a gradient (plain backward, on a copy)."""
    twin = copy.deepcopy(model)
    twin(**batch).loss.backward()
    # Above rounding noise: a mixture-of-experts router that renormalises the weights of all its
    # experts gets gradients of ~1e-11, which an SGD step cannot change a weight by.
    return {
        n for n, p in twin.named_parameters() if p.grad is not None and p.grad.abs().max() > 1e-6
    }


@pytest.mark.parametrize(("model_type", "head", "n_blocks"), ARCHS, ids=lambda v: str(v))
def test_architecture(model_type, head, n_blocks):
    pytest.importorskip("transformers")
    model = tiny_auto_model(model_type, head).eval()  # eval: no dropout, runs are comparable
    batch = _batch(model, head)
    units = split_units(model)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}

    # Every trainable parameter in exactly one unit; each block unit is exactly one block.
    placed = [n for u in units for n in u.params]
    assert sorted(placed) == sorted(named)
    blocks = [u for u in units if u.module is not None]
    assert len(blocks) == n_blocks, [u.name for u in units]
    in_blocks: set[int] = set()
    for u in blocks:
        own = {id(p) for p in model.get_submodule(u.module).parameters() if p.requires_grad}
        assert {id(named[n]) for n in u.params} == own
        in_blocks |= own
    assert not any(id(named[n]) in in_blocks for u in units if u.module is None for n in u.params)

    reached = _reached(model, batch)
    single = copy.deepcopy(model)
    plain = copy.deepcopy(model)

    # One cycle, m = 1: each parameter the loss reaches changes in exactly one step, and the
    # blocks below the active one build no graph although the embedding output requires grad.
    # (Not requires_grad_() on the output: a model scaling it in place would meet a leaf.)
    model.get_input_embeddings().register_forward_hook(
        lambda m, a, out: out if out.requires_grad else out * torch.ones((), requires_grad=True)
    )
    needs_grad: dict[str, bool] = {}
    for u in blocks:
        model.get_submodule(u.module).register_forward_hook(
            lambda m, a, out, name=u.name: needs_grad.__setitem__(
                name, bool(getattr(_first_tensor(out), "requires_grad", False))
            )
        )
    opt = HiFTOptimizer(model, torch.optim.SGD, HiFTConfig(offload="none"), lr=0.5)
    changed = {n: 0 for n in named}
    for step in range(opt.num_groups):
        group = opt._group_units[opt._order[opt.active_group]]
        before = {n: p.detach().clone() for n, p in named.items()}
        model(**batch).loss.backward()
        active = [u.name for u in group if u.module is not None]
        if active:
            lowest = [u.name for u in blocks].index(active[0])
            assert [needs_grad[u.name] for u in blocks[:lowest]] == [False] * lowest, step
        opt.step()
        opt.zero_grad()
        for n, p in named.items():
            changed[n] += not torch.equal(before[n], p)
    wrong = {n: c for n, c in changed.items() if c > 1 or (n in reached and c != 1)}
    assert wrong == {}, f"changed this many times in one cycle: {wrong}"
    assert reached, "the loss reaches no parameter"

    # A single group is the plain optimizer.
    one = HiFTOptimizer(
        single, torch.optim.AdamW, HiFTConfig(units_per_group=len(units), offload="none"), lr=1e-2
    )
    ref = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    for _ in range(2):
        for m, o in ((single, one), (plain, ref)):
            m(**batch).loss.backward()
            o.step()
            o.zero_grad()
    for (n, a), b in zip(single.named_parameters(), plain.parameters(), strict=True):
        if not a.requires_grad:
            continue  # fixed tables (sinusoidal positions)
        assert torch.allclose(a, b, atol=1e-6), n
