"""Backward truncation: no autograd graph below the lowest active block, hooks gone on close."""

import pytest
import torch

from hiftune import HiFTConfig, HiFTOptimizer
from tinymodels import lm_loss, tiny_hf_config


def _count_block_calls(model):
    # Checkpointing re-runs a block's forward (not its __call__) in backward, so count calls of
    # a submodule inside it.
    calls = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("budget", [None, 1000])  # 1000: each block in sub-units (attention, MLP)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_no_graph_below_the_lowest_active_block(checkpointing, budget):
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(tiny_hf_config("llama"))
    model.train()
    if checkpointing:
        # HF makes the embedding output require grad here, which would build the graph through
        # every frozen block; hiftune's hooks must undo that below the active block.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    config = HiFTConfig(offload="none", max_unit_params=budget)
    opt = HiFTOptimizer(model, torch.optim.SGD, config, lr=0.1)
    outputs_need_grad = [None] * 3
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(
            lambda m, a, out, i=i: outputs_need_grad.__setitem__(
                i, (out[0] if isinstance(out, tuple) else out).requires_grad
            )
        )
    calls = _count_block_calls(model)
    ids = torch.randint(0, 64, (2, 8))
    while not opt.group_names[opt.active_group].startswith("layers.1"):
        opt.step()  # embed, layers.0 (or their pieces) -> layers.1
    trained = []
    while opt.group_names[opt.active_group].startswith("layers.1"):
        trained.append(opt.group_names[opt.active_group])
        calls[:] = [0, 0, 0]
        model(input_ids=ids, labels=ids).loss.backward()
        assert outputs_need_grad == [False, True, True]
        # With checkpointing, blocks that build a graph run again in backward; layers.0 not.
        assert calls == ([1, 2, 2] if checkpointing else [1, 1, 1])
        # The active block (or part of it) still gets its gradients (reentrant checkpointing
        # needs a grad-requiring input).
        names = set(opt.groups[opt.active_group])
        active = [p for n, p in model.named_parameters() if n in names]
        assert active and all(p.grad is not None and p.grad.abs().sum() > 0 for p in active)
        opt.step()
        opt.zero_grad()
    if budget is None:
        assert trained == ["layers.1"]
    else:  # attention with its norms, then the MLP's projections, in the order they run
        assert trained == [
            "layers.1.input_layernorm+self_attn+post_attention_layernorm",
            "layers.1.mlp.gate_proj",
            "layers.1.mlp.up_proj",
            "layers.1.mlp.down_proj",
        ]


def test_truncation_hooks_are_removed_on_close(tiny_lm):
    opt = HiFTOptimizer(tiny_lm, torch.optim.SGD, lr=0.1)
    assert all(len(b._forward_pre_hooks) == 1 for b in tiny_lm.blocks)
    assert all(len(b._forward_hooks) == 1 for b in tiny_lm.blocks)
    opt.close()
    assert all(len(b._forward_pre_hooks) == 0 for b in tiny_lm.blocks)
    assert all(len(b._forward_hooks) == 0 for b in tiny_lm.blocks)


def test_a_grad_requiring_input_builds_no_graph_below_the_active_block(tiny_lm, batches):
    # What Hugging Face's enable_input_require_grads does for gradient checkpointing: the
    # embedding output requires grad, so freezing alone would build a graph through every block.
    tiny_lm.embed.register_forward_hook(lambda m, args, out: out.requires_grad_(True))
    for block in tiny_lm.blocks:
        block.gradient_checkpointing = True  # the flag checkpointed Hugging Face blocks carry
    opt = HiFTOptimizer(tiny_lm, torch.optim.SGD, HiFTConfig(offload="none"), lr=0.1)
    seen = []
    for i, block in enumerate(tiny_lm.blocks):
        # prepend: run before hiftune's own forward hook, which restores the flag
        block.register_forward_hook(
            lambda m, args, out, i=i: seen.append((i, out.requires_grad, m.gradient_checkpointing)),
            prepend=True,
        )
    while opt.group_names[opt.active_group] != "layers.2":
        opt.step()  # embed, layers.0, layers.1 -> layers.2
    lm_loss(tiny_lm, batches[0]).backward()
    # Below the active block: no graph, and checkpointing paused for the call.
    assert seen == [(0, False, False), (1, False, False), (2, True, True), (3, True, True)]
    assert all(block.gradient_checkpointing for block in tiny_lm.blocks)  # restored afterwards
    assert all(p.grad is not None for p in opt.active_parameters())


def test_between_two_stacks_only_the_first_stack_is_cut_off():
    # T5 with reentrant checkpointing: training the unit between encoder and decoder (the
    # encoder's final norm) must detach only the encoder blocks, and give the norm its gradient.
    pytest.importorskip("transformers")
    from tinymodels import tiny_auto_model

    model = tiny_auto_model("t5", "seq2seq-lm")
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    opt = HiFTOptimizer(model, torch.optim.SGD, HiFTConfig(offload="none"), lr=0.1)
    for _ in range(opt.group_names.index("between.2")):
        opt.step()
    blocks = [*model.encoder.block, *model.decoder.block]
    needs_grad = [None] * len(blocks)
    for i, block in enumerate(blocks):
        block.register_forward_hook(
            lambda m, a, out, i=i: needs_grad.__setitem__(i, out[0].requires_grad)
        )
    ids = torch.randint(3, 96, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert needs_grad == [False, False, True, True]
    (norm,) = opt.active_parameters()
    assert norm is model.encoder.final_layer_norm.weight and norm.grad.abs().sum() > 0
