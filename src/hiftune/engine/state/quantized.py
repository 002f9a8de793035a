"""8-bit Adam moments in the store: an inexact option, as a store that wraps another.

Adam's two moments are 8 of the 12 bytes a paged-out parameter takes in bf16 mixed precision
(with compact masters, 8 of 10.125). :class:`Int8MomentStore` pages them out as bitsandbytes'
blockwise dynamic 8-bit quantisation (the format of its 8-bit optimizers: one byte per element
and one fp32 scale per block of 256), about 1.02 bytes per element instead of 4, and restores fp32
moments on the way back. The optimizer itself steps in fp32 as before; each page-out rounds the
moments once more, so training is **not** equal to training without it (see the tests for the
error bounds). Checkpoints hold the fp32 moments as restored.

bitsandbytes is optional (``pip install bitsandbytes``); its CPU and CUDA backends both work.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from ...errors import UserError
from .store import StateStore, Tensors

#: Elements per quantisation block (bitsandbytes' 8-bit optimizers use 256 too).
BLOCK = 256

#: Optimizer state entries (``state.<i>.<key>``) stored in 8 bits, with whether they are signed.
MOMENTS = {"exp_avg": True, "exp_avg_sq": False}

_Q, _SCALE = "#int8", "#absmax"


class Int8MomentStore(StateStore):
    """Wraps ``inner``: Adam's moments (``exp_avg``, ``exp_avg_sq``) go in as 8-bit blocks.

    Pass it as ``HiFTOptimizer(..., store=Int8MomentStore(make_store("host")))``. Other tensors,
    and moments under ``min_numel`` elements or not fp32, pass through unchanged.

    Args:
        inner: Where the (quantised) tensors live.
        min_numel: Smaller moments are stored whole (their bytes do not matter, their precision
            may: a LayerNorm's).

    Raises:
        UserError: If bitsandbytes is not installed.
    """

    def __init__(self, inner: StateStore, *, min_numel: int = 4096) -> None:
        try:
            import bitsandbytes.functional as bnb
        except ImportError:
            raise UserError(
                "8-bit optimizer state needs bitsandbytes: pip install bitsandbytes"
            ) from None
        self._bnb: Any = bnb
        self.inner = inner
        self.min_numel = min_numel
        self._codes = {signed: bnb.create_dynamic_map(signed=signed) for signed in (True, False)}

    def put(self, key: int, tensors: Tensors) -> None:
        out: Tensors = {}
        for name, t in tensors.items():
            signed = MOMENTS.get(name.rsplit(".", 1)[-1])
            if signed is None or not self._quantizes(t):
                out[name] = t
                continue
            code = self._codes[signed].to(t.device)
            q, state = self._bnb.quantize_blockwise(t.detach(), code=code, blocksize=BLOCK)
            out[name + _Q], out[name + _SCALE] = q, state.absmax
        self.inner.put(key, out)

    def get(self, key: int) -> Tensors:
        return self._restore(self.inner.get(key))

    def peek(self, key: int) -> Tensors:
        return self._restore(self.inner.peek(key))

    def prefetch(self, key: int) -> None:
        self.inner.prefetch(key)

    def flush(self) -> None:
        self.inner.flush()

    def __contains__(self, key: int) -> bool:
        return key in self.inner

    def resident_bytes(self) -> int:
        return self.inner.resident_bytes()

    def close(self) -> None:
        self.inner.close()

    def _quantizes(self, t: torch.Tensor) -> bool:
        return (
            not isinstance(t, DTensor) and t.dtype == torch.float32 and t.numel() >= self.min_numel
        )

    def _restore(self, tensors: Tensors) -> Tensors:
        out: Tensors = {}
        for name, t in tensors.items():
            if name.endswith(_SCALE):
                continue
            if not name.endswith(_Q):
                out[name] = t
                continue
            base = name.removesuffix(_Q)
            signed = MOMENTS[base.rsplit(".", 1)[-1]]
            out[base] = self._bnb.dequantize_blockwise(
                t,
                absmax=tensors[base + _SCALE].to(t.device),
                code=self._codes[signed].to(t.device),
                blocksize=BLOCK,
            )
        return out
