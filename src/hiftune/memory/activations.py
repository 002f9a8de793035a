"""The tensors autograd saves for backward, estimated by one forward pass on the ``meta`` device.

Split out of :mod:`hiftune.memory.estimate`, which documents what the figures mean.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from torch import nn

from ..engine.split.trace import MetaAnswers
from ..engine.split.units import Unit
from ..engine.state.precision import DTYPES
from ..errors import UserError
from .batches import dummy_batches, first_that_runs

logger = logging.getLogger(__name__)

MiB = 2**20


def activation_estimates(
    model: nn.Module,
    groups: Sequence[tuple[Unit, ...]],
    precisions: Sequence[str],
    head: str,
    batch_size: int,
    seq_len: int,
) -> dict[str, dict[str, float]]:
    """Precision -> method -> saved-for-backward MiB (HiFT: its peak group), on the meta device."""
    if any(not p.is_meta for p in model.parameters()):
        raise UserError(
            "the activation estimate runs forward passes and needs a model on the meta device "
            "(build it with hiftune.memory.configs.build_model(..., device='meta'))"
        )
    out: dict[str, dict[str, float]] = {}
    by_dtype: dict[torch.dtype, dict[str, float]] = {}
    for precision in precisions:
        # Mixed precision computes (mostly) in half precision: count half-precision activations.
        dtype = DTYPES[precision]
        if dtype not in by_dtype:
            probe = copy.deepcopy(model).to(dtype)
            probe.train()  # training keeps dropout masks
            _run_every_layer(probe)
            config = getattr(probe, "config", None)
            if head == "seq-cls" and config is not None and config.pad_token_id is None:
                # Classification heads pool at the last non-pad token and refuse batches > 1
                # without a pad id; the id's value does not change what is saved.
                config.pad_token_id = 0
            names = [list(dict.fromkeys(n for u in g for n in u.params)) for g in groups]
            fpft = _saved_bytes(probe, None, head, batch_size, seq_len)
            hift = max(_saved_bytes(probe, g, head, batch_size, seq_len) for g in names)
            by_dtype[dtype] = {"fpft": fpft / MiB, "hift": hift / MiB}
            logger.info(
                "activation estimate (%s, batch %d x %d): FPFT %.0f MiB, HiFT peak %.0f MiB",
                dtype,
                batch_size,
                seq_len,
                fpft / MiB,
                hift / MiB,
            )
        out[precision] = by_dtype[dtype]
    return out


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
) -> int:
    """Bytes autograd saves in one forward with ``active`` (``None``: all) parameters trainable."""
    named = dict(model.named_parameters())
    trainable = set(named) if active is None else set(active)
    for n, p in named.items():
        p.requires_grad_(n in trainable)
    # Weights saved for backward are already counted as weights; count each storage once.
    weights = {p.untyped_storage()._cdata for p in named.values()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return t

    batches = dummy_batches(model, head, batch_size, seq_len)
    try:  # no loss on meta (e.g. CTC): the batch without labels; a failed try's tensors forgotten
        with MetaAnswers(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            first_that_runs(model, batches, before_each=saved.clear)
    except Exception as error:  # a model that cannot run on meta: say so instead of guessing
        raise UserError(
            f"cannot estimate activations of {type(model).__name__} on the meta device: "
            f"{type(error).__name__}: {error} (leave out batch_size/seq_len for the other figures)"
        ) from error
    return sum(saved.values())
