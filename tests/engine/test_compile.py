"""``torch.compile``: a compiled model trains exactly like the eager one, compiled before or after
the optimizer is built (``backend="eager"``: dynamo's tracing without a code generator, fast)."""

import functools

import pytest
import torch

from hiftune import HiFTConfig, HiFTOptimizer
from tinymodels import TinyLM, lm_loss, snapshot

STEPS = 4  # the 3 row shards of the tied embedding, then the positions


@functools.cache
def _train(compile_: str) -> tuple[tuple[str, ...], dict[str, torch.Tensor]]:
    """Group names and weights after ``STEPS`` steps (cached: the eager reference runs once).

    ``compile_``: ``none``; ``before``: the optimizer is built on ``torch.compile(model)`` (an
    ``OptimizedModule``); ``after``: the model is compiled once the optimizer is built.
    """
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyLM(vocab=200, layers=2, tie=True)
    trained: torch.nn.Module = model
    if compile_ == "before":
        trained = torch.compile(model, backend="eager")
    opt = HiFTOptimizer(trained, torch.optim.AdamW, HiFTConfig(offload="none"), lr=1e-2)
    if compile_ == "after":
        trained = torch.compile(model, backend="eager")
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        lm_loss(trained, torch.randint(0, 200, (4, 12), generator=g)).backward()
        opt.step()
        opt.zero_grad()
    names = tuple(n.replace("_orig_mod.", "") for n in opt.group_names)
    opt.close()
    return names, snapshot(model)


@pytest.mark.slow  # dynamo's first compile takes seconds
@pytest.mark.parametrize("compile_", ["before", "after"])
def test_a_compiled_model_trains_bit_for_bit_like_the_eager_one(compile_):
    # Built on torch.compile(model), the unit split used to trace the compiled forward, where the
    # tied embedding looked first used after the blocks: its row shards joined the head's group,
    # backward stopped below them and they trained on the LM head's gradient alone.
    want_names, want = _train("none")
    names, got = _train(compile_)
    assert names == want_names
    assert names[0].startswith("embed.embed.weight[")
    for n, p in want.items():
        assert torch.equal(got[n], p), n
