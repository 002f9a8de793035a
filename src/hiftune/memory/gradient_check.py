"""Which trainable parameters would get no gradient, per HiFT group, found on a dummy batch.

For each group, one forward pass runs with the engine's backward truncation set for that group
(:class:`~hiftune.engine.truncation.BackwardTruncation`, as a training step sets it), and the
autograd graph is walked from the loss to the parameters it reaches: what backward would give a
gradient, without running backward. On the ``meta`` device nothing is computed, so a pass costs
well under a second even for a 7B model. A first pass with everything trainable also notes which
blocks call the module owning each parameter (a table every block uses is *shared*).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..engine.split.trace import MetaAnswers
from ..engine.split.units import Unit, group_name
from ..engine.truncation import BackwardTruncation
from .batches import dummy_batches, first_that_runs

#: A model that cannot run on ``meta`` is rebuilt for the check up to this many parameters.
REAL_CHECK_PARAMS = 50_000_000
#: The key of the no-gradient result for parameters no pass reaches, HiFT or not.
FULL = "(full fine-tuning)"


def check_gradients(
    model: nn.Module, units: Sequence[Unit], groups: Sequence[tuple[Unit, ...]], head: str
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``(shared, no_gradient)`` of ``model`` split into ``units`` and ``groups``.

    Args:
        model: The model (its ``requires_grad`` flags and mode are restored afterwards).
        units: Its units, bottom-up, as :func:`hiftune.split_units` gives them.
        groups: The groups of those units.
        head: A key of :data:`~.configs.HEADS`: the dummy batch and its labels.

    Returns:
        ``shared``: parameter name -> the blocks (or ``"outside blocks"``) that call it, for those
        used in more than one. ``no_gradient``: group name (or :data:`FULL`) -> its parameters no
        gradient reaches.

    Raises:
        Exception: Whatever the model's forward raises on the dummy batch, when it fails on the
            ``meta`` device and cannot be rebuilt for real (see :data:`REAL_CHECK_PARAMS`).
    """
    try:
        return _check(model, units, groups, head)
    except Exception:
        real = _real_copy(model)
        if real is None:
            raise
        return _check(real, units, groups, head)


def dummy_loss(model: nn.Module, head: str) -> torch.Tensor:
    """The loss of one dummy example for a ``head`` model (:func:`~.batches.dummy_batches`).

    A row of 8 tokens (the last one end-of-sequence) and whatever else the model takes (pixels, a
    spectrogram, a waveform), with the head's labels; if the model cannot compute its loss on it,
    the same without labels, and any scalar that depends on every output stands for the loss.

    Raises:
        Exception: What the model raises on the batch with labels, if no batch runs.
    """
    out = first_that_runs(model, dummy_batches(model, head))
    loss = getattr(out, "loss", None)
    if loss is None:  # no loss of its own: any scalar that depends on every output will do
        first = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
        loss = first.float().sum()
    return loss


def _real_copy(model: nn.Module) -> nn.Module | None:
    """``model`` rebuilt on the CPU with random weights, if it is a small config-built model."""
    config = getattr(model, "config", None)
    on_meta = any(p.is_meta for p in model.parameters())
    if (
        config is None
        or not on_meta
        or sum(p.numel() for p in model.parameters()) > REAL_CHECK_PARAMS
    ):
        return None
    with torch.device("cpu"):
        return type(model)(copy.deepcopy(config))


def _check(
    model: nn.Module,
    units: Sequence[Unit],
    groups: Sequence[tuple[Unit, ...]],
    head: str,
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``(shared, no_gradient)``: parameters used by several blocks, and those no pass reaches."""
    named = dict(model.named_parameters())
    managed = list(dict.fromkeys(n for u in units for n in u.params))  # a sharded one once
    flags = {n: p.requires_grad for n, p in named.items()}
    was_training = model.training
    model.eval()  # no dropout: a dummy batch only has to reach every parameter
    truncation = None
    no_gradient: dict[str, list[str]] = {}
    # Every managed parameter trainable in every pass: whether one is reached depends only on the
    # graph between it and the loss (and the truncation), not on which others require grad.
    for n, p in named.items():
        p.requires_grad_(n in set(managed))
    try:
        used_by, handles = _record_use(model, units)
        try:  # the first pass, without truncation, notes which block uses what
            got = _reached(model, named, head)
        finally:
            for h in handles:
                h.remove()
        unused = [n for n in managed if n not in got]
        if unused:
            no_gradient[FULL] = unused
        truncation = BackwardTruncation(model, units)
        for g in groups:
            truncation.set_active(g)
            reached = _reached(model, named, head)
            params = dict.fromkeys(n for u in g for n in u.params)
            cut = [n for n in params if n not in unused and n not in reached]
            if cut:
                no_gradient[group_name(g)] = cut
    finally:
        if truncation is not None:
            truncation.remove()
        for n, p in named.items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    shared = {n: sorted(b) for n, b in used_by.items() if len(b) > 1}
    return shared, no_gradient


def _reached(model: nn.Module, named: dict[str, nn.Parameter], head: str) -> set[str]:
    """Names of the parameters a backward pass from the dummy loss would give a gradient.

    Walks the autograd graph of one forward pass instead of running backward: the same answer
    without computing a single gradient.
    """
    name_of = {id(p): n for n, p in named.items()}
    with MetaAnswers():  # value queries on meta (a mask's shortcut, LLaVA's token count)
        loss = dummy_loss(model, head)
    reached: set[str] = set()
    seen: set[Any] = set()
    todo = [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf's gradient
        if variable is not None and id(variable) in name_of:
            reached.add(name_of[id(variable)])
        todo += [next_node for next_node, _ in node.next_functions]
    return reached


def _record_use(model: nn.Module, units: Sequence[Unit]) -> tuple[dict[str, set[str]], list[Any]]:
    """Hooks that note, during the next forwards, which block uses each parameter.

    Returns:
        ``(used, handles)``: ``used`` fills as the model runs, parameter name (as in
        ``named_parameters()``) -> the block units (or ``"outside blocks"``) whose forward called a
        module owning it; remove the ``handles`` when done.
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    used: dict[str, set[str]] = {}
    stack: list[str] = []
    handles = []
    # One name per block: its unit's, or for a block split into sub-units the unit it was split from.
    blocks = {u.module: u.parent or u.name for u in units if u.module is not None}
    for path, name in blocks.items():
        block = model.get_submodule(path)
        handles.append(block.register_forward_pre_hook(lambda *_, n=name: stack.append(n)))
        handles.append(block.register_forward_hook(lambda *_: _pop(stack), always_call=True))
    for module in model.modules():
        own = [canonical[id(p)] for p in module.parameters(recurse=False)]
        if own:

            def note(*_: Any, own: list[str] = own) -> None:
                for n in own:
                    used.setdefault(n, set()).add(stack[-1] if stack else "outside blocks")

            handles.append(module.register_forward_pre_hook(note))
    return used, handles


def _pop(stack: list[str]) -> None:
    stack.pop()  # a forward hook's return value would replace the block's output
