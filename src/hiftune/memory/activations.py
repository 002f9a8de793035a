"""The tensors autograd saves for backward, estimated by one forward pass on the ``meta`` device.

Every tensor a forward pass saves for backward is seen through
:func:`torch.autograd.graph.saved_tensors_hooks` and counted once per storage (weights are counted
as weights, not here). Each is put in one of three places:

* **logits**: a tensor whose last dimension is the vocabulary (the LM head's output and the loss's
  fp32 upcast of it). Their component adds one fp32 gradient of the largest of them, which
  backward makes while they are still alive: batch x sequence x vocabulary x 4 bytes.
* **a block**: saved while a transformer block (a ``GradientCheckpointingLayer``, the modules
  ``gradient_checkpointing_enable`` checkpoints) runs; its input is noted too.
* **outside** the blocks: embeddings, final norm, heads.

Without gradient checkpointing the activations are ``outside + every block's tensors``. With it,
as Hugging Face applies it (each block's forward recomputed in backward from its saved input),
they are ``outside + the input of every block that builds a graph + the largest block's tensors``
(the one block recomputed at a time). A block below HiFT's active group builds no graph, saves
nothing and keeps no input (:mod:`hiftune.engine.truncation` detaches it).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..engine.split.trace import MetaAnswers
from ..engine.split.units import Unit
from ..engine.state.precision import DTYPES
from ..errors import UserError
from .batches import dummy_batches, first_that_runs

logger = logging.getLogger(__name__)

MiB = 2**20
#: Bytes of the fp32 gradient of the loss's logits.
_FP32 = 4


@dataclass(frozen=True)
class Saved:
    """Saved-for-backward memory of one forward pass, MiB.

    Attributes:
        activations: Every saved tensor but the logits (after checkpointing, if asked for).
        logits: The saved logit tensors plus one fp32 gradient of the largest of them.
    """

    activations: float
    logits: float

    @property
    def total(self) -> float:
        """Activations + logits, MiB."""
        return self.activations + self.logits


@dataclass
class _Breakdown:
    """Where the bytes of one forward pass were saved (see the module docstring)."""

    outside: int = 0
    outside_inputs: int = 0  # of ``outside``: blocks' inputs (kept as such under checkpointing)
    logits: int = 0
    largest_logits: int = 0  # elements of the largest logit tensor
    blocks: dict[int, int] = field(default_factory=dict)  # block -> bytes saved in it
    internals: dict[int, int] = field(default_factory=dict)  # of ``blocks``: not blocks' inputs
    inputs: dict[int, int] = field(default_factory=dict)  # block -> bytes of its input

    def saved(self, gradient_checkpointing: bool) -> Saved:
        if gradient_checkpointing and self.blocks:
            outside = self.outside - self.outside_inputs
            inner = sum(self.inputs.values()) + max(self.internals.values())
        else:
            outside, inner = self.outside, sum(self.blocks.values())
        logits = self.logits + self.largest_logits * _FP32 if self.logits else 0
        return Saved((outside + inner) / MiB, logits / MiB)


#: Cache of :func:`activation_estimates` passes: (dtype, head, batch, seq, active names) -> bytes.
PassCache = dict[tuple[Any, ...], _Breakdown]


def activation_estimates(
    model: nn.Module,
    groups: Sequence[tuple[Unit, ...]],
    precisions: Sequence[str],
    head: str,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool = False,
    cache: PassCache | None = None,
) -> dict[str, dict[str, Saved]]:
    """Precision -> method -> saved-for-backward memory (HiFT: the largest over its groups).

    Args:
        model: A model on the ``meta`` device.
        groups: HiFT's groups of units.
        precisions: Names of :data:`~hiftune.engine.state.precision.DTYPES`.
        head: The head the model was built with (for its dummy batch).
        batch_size: Batch size of the dummy batch.
        seq_len: Its sequence length.
        gradient_checkpointing: Count as Hugging Face's gradient checkpointing keeps them.
        cache: Passes already run on this ``model`` (the same key runs once): a fit search asks
            for the same groups with and without checkpointing.

    Raises:
        UserError: For a model off the meta device, or one that cannot run there.
    """
    if any(not p.is_meta for p in model.parameters()):
        raise UserError(
            "the activation estimate runs forward passes and needs a model on the meta device "
            "(build it with hiftune.memory.configs.build_model(..., device='meta'))"
        )
    cache = {} if cache is None else cache
    out: dict[str, dict[str, Saved]] = {}
    by_dtype: dict[torch.dtype, dict[str, Saved]] = {}
    for precision in precisions:
        # Mixed precision computes (mostly) in half precision: count half-precision activations.
        dtype = DTYPES[precision]
        if dtype not in by_dtype:
            probe: nn.Module | None = None

            def run(active: list[str] | None, dtype: torch.dtype = dtype) -> Saved:
                nonlocal probe
                key = (dtype, head, batch_size, seq_len, None if active is None else tuple(active))
                if key not in cache:
                    if probe is None:
                        probe = _probe(model, dtype, head)
                    cache[key] = _saved_bytes(probe, active, head, batch_size, seq_len)
                return cache[key].saved(gradient_checkpointing)

            names = [list(dict.fromkeys(n for u in g for n in u.params)) for g in groups]
            fpft = run(None)
            hift = max((run(g) for g in names), key=lambda s: s.total)
            by_dtype[dtype] = {"fpft": fpft, "hift": hift}
            logger.info(
                "activation estimate (%s, batch %d x %d%s): FPFT %.0f MiB, HiFT peak %.0f MiB",
                dtype,
                batch_size,
                seq_len,
                ", checkpointed" if gradient_checkpointing else "",
                fpft.total,
                hift.total,
            )
        out[precision] = by_dtype[dtype]
    return out


def _probe(model: nn.Module, dtype: torch.dtype, head: str) -> nn.Module:
    """A copy of ``model`` in ``dtype``, in training mode, that runs every layer."""
    probe = copy.deepcopy(model).to(dtype)
    probe.train()  # training keeps dropout masks
    _run_every_layer(probe)
    config = getattr(probe, "config", None)
    if head == "seq-cls" and config is not None and config.pad_token_id is None:
        # Classification heads pool at the last non-pad token and refuse batches > 1
        # without a pad id; the id's value does not change what is saved.
        config.pad_token_id = 0
    return probe


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost modules ``gradient_checkpointing_enable`` checkpoints (none: none known)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: checkpointing is not counted
        return []
    out: list[nn.Module] = []
    inner: set[int] = set()
    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer) and id(m) not in inner:
            out.append(m)
            inner.update(id(s) for s in m.modules())
    return out


def _vocab_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "vocab_size", None)
    return size if isinstance(size, int) else None


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor):
        return hidden
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)


#: Layer-drop probabilities: in training mode a block is skipped at random with it.
_LAYER_DROP = ("layerdrop", "encoder_layerdrop", "decoder_layerdrop")


def _run_every_layer(model: nn.Module) -> None:
    """Sets layer-drop to 0 (the peak is a step that skips no block, and one pass must not be
    random). Modules read it from their config (wav2vec2) or keep a copy of their own (BART)."""
    configs = [c for m in model.modules() if (c := getattr(m, "config", None)) is not None]
    for owner in [*model.modules(), *configs]:
        for name in _LAYER_DROP:
            if isinstance(getattr(owner, name, None), float):
                setattr(owner, name, 0.0)


def _saved_bytes(
    model: nn.Module, active: list[str] | None, head: str, batch_size: int, seq_len: int
) -> _Breakdown:
    """Where autograd saves bytes in one forward with ``active`` (``None``: all) trainable."""
    named = dict(model.named_parameters())
    trainable = set(named) if active is None else set(active)
    for n, p in named.items():
        p.requires_grad_(n in trainable)
    # Weights saved for backward are already counted as weights; count each storage once.
    weights = {p.untyped_storage()._cdata for p in named.values()}
    vocab = _vocab_size(model)
    # storage -> (where: -2 logits, -1 outside, i >= 0 block i; bytes; elements)
    saved: dict[int, tuple[int, int, int]] = {}
    inputs: dict[int, tuple[int, int]] = {}  # input storage -> (block, bytes)
    stack: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in weights and storage._cdata not in saved:
            is_logits = vocab is not None and t.dim() >= 2 and t.shape[-1] == vocab
            where = -2 if is_logits else (stack[-1] if stack else -1)
            saved[storage._cdata] = (where, storage.nbytes(), t.numel())
        return t

    def enter(index: int) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            stack.append(index)
            x = _first_tensor(args, kwargs)
            if x is not None:
                inputs.setdefault(x.untyped_storage()._cdata, (index, x.untyped_storage().nbytes()))

        return hook

    def leave(*_: Any) -> None:
        stack.pop()

    def clear() -> None:
        saved.clear()
        inputs.clear()
        stack.clear()

    handles = []
    for i, block in enumerate(_blocks(model)):
        handles.append(block.register_forward_pre_hook(enter(i), with_kwargs=True))
        handles.append(block.register_forward_hook(leave, always_call=True))
    batches = dummy_batches(model, head, batch_size, seq_len)
    try:  # no loss on meta (e.g. CTC): the batch without labels; a failed try's tensors forgotten
        with MetaAnswers(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            first_that_runs(model, batches, before_each=clear)
    except Exception as error:  # a model that cannot run on meta: say so instead of guessing
        raise UserError(
            f"cannot estimate activations of {type(model).__name__} on the meta device: "
            f"{type(error).__name__}: {error} (leave out batch_size/seq_len for the other figures)"
        ) from error
    finally:
        for h in handles:
            h.remove()
    out = _Breakdown()
    block_inputs = set(inputs)
    for cdata, (where, nbytes, numel) in saved.items():
        if where == -2:
            out.logits += nbytes
            out.largest_logits = max(out.largest_logits, numel)
        elif where == -1:
            out.outside += nbytes
            out.outside_inputs += nbytes if cdata in block_inputs else 0
        else:
            out.blocks[where] = out.blocks.get(where, 0) + nbytes
            inner = 0 if cdata in block_inputs else nbytes
            out.internals[where] = out.internals.get(where, 0) + inner
    # Under checkpointing a block keeps its input only if it builds a graph (saves something).
    out.inputs = {block: nbytes for block, nbytes in inputs.values() if block in out.blocks}
    return out
