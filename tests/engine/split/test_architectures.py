"""The unit split across ``transformers`` architectures: tiny models from their default configs.

For each architecture (decoder LLMs incl. mixtures of experts, encoders, encoder-decoders), with
m = 1, with the default split and with the paper's (``max_unit_params=None``): every trainable
parameter (every row of a sharded one) is in exactly one group, no group holds parts of two blocks,
every block of every stack is covered; in one cycle each step's gradient of the active group equals
a plain backward with only that group trainable, each row with a gradient changes exactly once,
and frozen blocks below the active one build a graph only where that plain backward does (none,
but in a recurrent model), even with a grad-requiring embedding output, as gradient checkpointing
makes it; and a single group equals the plain optimizer. The tiny configs' vocabularies are small, so the default split seldom differs from the
paper's there; a budget of half a block (blocks into sub-units, embeddings and heads into row
shards) runs on a subset that covers each kind of model.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from hiftune import HiFTConfig, HiFTOptimizer, split_units
from hiftune.engine.split.dummy import input_embeddings
from hiftune.engine.split.trace import trace_forward
from hiftune.engine.split.units import find_block_stacks, unit_numel
from tinymodels import MODALITY_HEADS, tiny_auto_model

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

#: Architectures that also run with a budget of half their largest block: dense and MoE decoders,
#: GPT-2's Conv1D, a hybrid, a tied embedding, encoders, encoder-decoders (T5's shared bias table).
HALF_BLOCK = {"llama", "gemma", "gpt2", "mixtral", "qwen2_moe", "olmo_hybrid", "bert", "t5", "bart"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices: on a shared machine, torch's thread pool costs ~100x the arithmetic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(model: nn.Module, head: str) -> dict[str, torch.Tensor]:
    if head in MODALITY_HEADS:  # pixels, spectrograms, waveforms: the memory tools' batches
        from hiftune.memory.batches import dummy_batches

        return dummy_batches(model, head, batch_size=2, seq_len=400 if head == "ctc" else 8)[0]
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


def _rows(shape: torch.Size) -> int:
    return shape[0] if len(shape) else 1


def _check_partition(model: nn.Module, units, n_blocks: int) -> None:
    """Every row of every trainable parameter in exactly one unit; blocks covered, never mixed."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    cover: dict[str, list[tuple[int, int]]] = {n: [] for n in named}
    for u in units:
        assert len(set(u.params)) == len(u.params), u.name
        for n in u.params:
            cover[n].append(u.rows.get(n, (0, _rows(named[n].shape))))
    for n, ranges in cover.items():
        ranges.sort()
        assert ranges and ranges[0][0] == 0 and ranges[-1][1] == _rows(named[n].shape), n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges)), (n, ranges)
    # Each block's parameters lie exactly in the units of that block, which hold nothing else.
    blocks = list(dict.fromkeys(u.module for u in units if u.module is not None))
    assert len(blocks) == n_blocks, [u.name for u in units]
    in_blocks: set[int] = set()
    for path in blocks:
        own = {id(p) for p in model.get_submodule(path).parameters() if p.requires_grad}
        assert {id(named[n]) for u in units if u.module == path for n in u.params} == own
        in_blocks |= own
    assert not any(id(named[n]) in in_blocks for u in units if u.module is None for n in u.params)


def _grad_rows(p: nn.Parameter) -> torch.Tensor:
    """Which rows of ``p`` have a gradient above rounding noise."""
    # A mixture-of-experts router that renormalises the weights of all its experts gets
    # gradients of ~1e-11, which an SGD step cannot change a weight by.
    if p.grad is None:
        return torch.zeros(_rows(p.shape), dtype=torch.bool)
    return p.grad.abs().reshape(_rows(p.shape), -1).amax(dim=1) > 1e-6


def _reached(model: nn.Module, batch: dict[str, torch.Tensor]) -> set[str]:
    """Names of the parameters the loss gives a gradient (plain backward, on a copy)."""
    twin = copy.deepcopy(model)
    twin(**batch).loss.backward()
    return {n for n, p in twin.named_parameters() if _grad_rows(p).any()}


def _changed_rows(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    rows = _rows(before.shape)
    return (before.reshape(rows, -1) != after.detach().reshape(rows, -1)).any(dim=1)


# Every architecture with the default and the paper's split; the half-block budget (every block
# split into its modules) on a subset, to keep the file fast.
CASES = [
    pytest.param(*arch, split, id=f"{arch[0]}-{arch[1]}-{split}")
    for arch in ARCHS
    for split in ("default", "paper", "half-block")
    if split != "half-block" or arch[0] in HALF_BLOCK
]


@pytest.mark.parametrize(("model_type", "head", "n_blocks", "split"), CASES)
def test_architecture(model_type, head, n_blocks, split):
    pytest.importorskip("transformers")
    model = tiny_auto_model(model_type, head).eval()  # eval: no dropout, runs are comparable
    check_split(model, _batch(model, head), n_blocks, split)


#: Models that take pixels, a spectrogram or a waveform: (kind, number of blocks over all stacks).
MODALITIES = [("vit", 2), ("whisper", 4), ("wav2vec2", 3), ("llava", 4)]


def _modality_batch(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (2, 8), generator=g)
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g), "labels": ids[:, 0] % 2}
    if kind == "whisper":
        return {"input_features": torch.randn(2, 16, 32, generator=g), "labels": ids}
    if kind == "wav2vec2":  # 2 stride-2 convolutions: 63 samples give 15 frames for 4 labels
        return {"input_values": torch.randn(2, 63, generator=g), "labels": ids[:, :4] % 20 + 1}
    # llava: a 32-pixel image in 8-pixel patches is 16 image tokens, placed before the text.
    image = torch.full((2, 16), 95)
    labels = torch.cat([torch.full_like(image, -100), ids], dim=1)
    return {
        "input_ids": torch.cat([image, ids], dim=1),
        "pixel_values": torch.randn(2, 3, 32, 32, generator=g),
        "labels": labels,
    }


@pytest.mark.parametrize(
    ("kind", "n_blocks", "split"),
    [(kind, n, split) for kind, n in MODALITIES for split in ("default", "paper", "half-block")],
)
def test_modality(kind, n_blocks, split):
    """Vision and audio towers are traced too: their blocks are units in the order they run."""
    pytest.importorskip("transformers")
    from tinymodels import tiny_modality_model

    model = tiny_modality_model(kind).eval()
    paths = [path for stack in find_block_stacks(model) for path in stack]
    traced = trace_forward(model, paths)
    assert traced is not None and traced.device == "meta" and len(traced.blocks) == n_blocks
    units = split_units(model, HiFTConfig(max_unit_params=None))
    blocks = [u.module for u in units if u.module is not None]
    # Traced, not by registration: whatever runs between two stacks is a unit between them.
    stacks = [b.rsplit(".", 1)[0] for b in blocks]
    if len(set(stacks)) > 1:
        assert any(u.name.startswith("between.") for u in units), [u.name for u in units]
    check_split(model, _modality_batch(kind), n_blocks, split)


def _make_input_require_grad(model: nn.Module) -> None:
    """Makes the token embedding's output require grad, as gradient checkpointing does."""
    embedding = input_embeddings(model)
    if embedding is None:
        return  # no token embedding (an audio model)

    # (Not requires_grad_() on the output: a model scaling it in place would meet a leaf.)
    def hook(m: nn.Module, args: object, out: object) -> object:
        # The first tensor of a tuple (I-BERT's quantised embedding returns its scale too).
        first = _first_tensor(out)
        if first is None or first.requires_grad:
            return out
        grad = first * torch.ones((), requires_grad=True)
        return grad if torch.is_tensor(out) else (grad, *out[1:])

    embedding.register_forward_hook(hook)


def check_split(model: nn.Module, batch: dict[str, torch.Tensor], n_blocks: int, split: str):
    """The checks of the module docstring, on ``model`` in eval mode (no dropout)."""
    budget: int | str | None = {"default": "auto", "paper": None}.get(split)
    if split == "half-block":
        shapes = {n: p.shape for n, p in model.named_parameters()}
        paper = split_units(model, HiFTConfig(max_unit_params=None))
        budget = max(unit_numel(u, shapes) for u in paper if u.module is not None) // 2
    config = HiFTConfig(offload="none", max_unit_params=budget)
    units = split_units(model, config)
    if split == "default" and units == split_units(model, HiFTConfig(max_unit_params=None)):
        return  # the same split as the paper's, which its own case trains
    _check_partition(model, units, n_blocks)
    if split == "half-block":
        assert any(u.parent is not None and u.module is not None for u in units)  # sub-units
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}

    reached = _reached(model, batch)
    single = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    twin = copy.deepcopy(model)  # the reference: no HiFT, no grad-requiring embedding output

    # One cycle, m = 1. At each step the active group's gradient is the plain backward's, on a
    # twin with the same weights and the same parameters trainable, and each row with a gradient
    # then changes in exactly that step (rows, not whole parameters: the weights below change
    # during the cycle, and with them which rows of a block above get a gradient when its turn
    # comes, e.g. dead ReLU rows or a router whose tokens all pick one expert for sure). The
    # blocks below the active one build a graph only where the twin's do, although the embedding
    # output requires grad: only a block called again after the active weights ran (a
    # recurrent model) or one making a grad-requiring tensor itself (MRA's CPU attention) does.
    _make_input_require_grad(model)
    blocks = list(dict.fromkeys(u.module for u in units if u.module is not None))
    needs_grad: dict[str, bool] = {}
    twin_needs_grad: dict[str, bool] = {}
    for net, flags in ((model, needs_grad), (twin, twin_needs_grad)):
        for path in blocks:
            net.get_submodule(path).register_forward_hook(
                lambda m, a, out, path=path, flags=flags: flags.__setitem__(
                    path, bool(getattr(_first_tensor(out), "requires_grad", False))
                )
            )
    opt = HiFTOptimizer(model, torch.optim.SGD, config, lr=0.5)
    changed = {n: torch.zeros(_rows(p.shape), dtype=torch.long) for n, p in named.items()}
    expected = {n: torch.zeros(_rows(p.shape), dtype=torch.bool) for n, p in named.items()}
    for step in range(opt.num_groups):
        group = opt._group_units[opt._rotation.active]
        active = {u.module for u in group if u.module is not None}
        assert len(active) <= 1, [u.name for u in group]  # never parts of two blocks
        before = {n: p.detach().clone() for n, p in named.items()}
        twin.load_state_dict(model.state_dict())
        trained = {n for u in group for n in u.params}
        for n, p in twin.named_parameters():
            p.requires_grad_(n in trained)
            p.grad = None
        twin(**batch).loss.backward()
        reference = dict(twin.named_parameters())
        model(**batch).loss.backward()
        if active:
            lowest = blocks.index(active.pop())
            below = blocks[:lowest]
            assert [needs_grad[p] for p in below] == [twin_needs_grad[p] for p in below], step
        opt.unscale_()  # row shards take their rows of the weight's gradient
        tensors = opt._tensors[opt._rotation.active]
        for n, rows, p in zip(tensors.names, tensors.rows, opt.master_parameters(), strict=True):
            start, stop = rows or (0, _rows(named[n].shape))
            ref = reference[n].grad
            ref = torch.zeros_like(p) if ref is None else ref[start:stop]
            got = torch.zeros_like(p) if p.grad is None else p.grad
            assert torch.allclose(got, ref, atol=1e-6), (step, n, start, stop)
            expected[n][start:stop] |= _grad_rows(p)
        opt.step()
        opt.zero_grad()
        for n, p in named.items():
            changed[n] += _changed_rows(before[n], p)
    wrong = {
        n: c.tolist() for n, c in changed.items() if (c > 1).any() or (c[expected[n]] != 1).any()
    }
    assert wrong == {}, f"rows changed this many times in one cycle: {wrong}"
    assert reached, "the loss reaches no parameter"

    # A single group is the plain optimizer.
    one = HiFTOptimizer(
        single,
        torch.optim.AdamW,
        HiFTConfig(units_per_group=len(units), offload="none", max_unit_params=budget),
        lr=1e-2,
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
