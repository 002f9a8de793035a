"""Row gradients: a row shard's gradient without its weight's full-size gradient.

Autograd computes the gradient of whole tensors. For a row shard of a token embedding or an LM
head (:mod:`.shards`) that is a gradient as large as the vocabulary matrix, computed only to keep
a few of its rows: on Llama-3.1-8B, 1 GiB in bf16 for a shard of 175M parameters. While a group
with row shards is active, the modules that own a sharded weight (both of them, for a tied one)
run their forward under a torch function mode that routes ``F.embedding`` and ``F.linear`` calls
on that weight through autograd functions whose backward gives each active shard the gradient of
its rows only, and the input its usual gradient. So a subclass that scales or post-processes the
lookup (Gemma's scaled word embedding) is covered as well as a plain ``nn.Embedding``: what counts
is the operation the module runs, not its class.

Correctness does not depend on finding every use of the weight: the weight keeps
``requires_grad=True`` while one of its shards is active, so any other use (a functional
``F.linear(hidden, embed.weight)`` outside its modules, ``hidden @ weight.T``, an embedding with
``max_norm``) still gives it an ordinary full-size gradient, whose rows
:func:`~.shards.take_grads` adds to the shards'. Only the memory saving is lost there.

A module's forward is wrapped through an instance attribute (``module.forward``), set when the
group becomes active and removed when it becomes inactive; a module whose forward someone else
already replaced that way (accelerate's offloading hooks) is left alone. A copy or a pickle of a
model taken while the wrapper is on gets its plain forward: the copy's gradients must reach its own
weights, not this optimizer's shards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .distributed import is_sharded

if TYPE_CHECKING:
    from .shards import RowShard

#: Row spans ``(start, stop)`` of the shards a function computes gradients for.
Spans = tuple[tuple[int, int], ...]


def row_gradient_owners(model: nn.Module) -> dict[int, list[nn.Module]]:
    """The modules to run under row gradients, per parameter (by ``id``).

    A parameter is listed when every module that registers it can be wrapped: its forward is its
    class's (not replaced on the instance), the parameter is not a distributed tensor, and an
    ``nn.Embedding`` owning it has no ``max_norm`` (which rewrites the weight), ``sparse`` or
    ``scale_grad_by_freq`` gradients.
    """
    owners: dict[int, list[nn.Module]] = {}
    excluded: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if _wrappable(module, p):
                owners.setdefault(id(p), []).append(module)
            else:
                excluded.add(id(p))
    return {k: v for k, v in owners.items() if k not in excluded}


def row_gradient_names(model: nn.Module) -> set[str]:
    """Names of the parameters whose row shards get row gradients (:func:`row_gradient_owners`);
    for a model on the ``meta`` device too (the memory estimator)."""
    owners = row_gradient_owners(model)
    return {n for n, p in model.named_parameters() if id(p) in owners}


def _wrappable(module: nn.Module, p: torch.Tensor) -> bool:
    own = vars(module).get("forward")
    if (own is not None and not isinstance(own, _Forward)) or is_sharded(p):
        return False
    return not isinstance(module, nn.Embedding) or not (
        module.max_norm is not None or module.sparse or module.scale_grad_by_freq
    )


class RowGradients:
    """Runs the modules that own a group's sharded weights under row gradients, while active.

    Args:
        owners: :func:`row_gradient_owners` of the model.
        shards: The group's row shards.
    """

    def __init__(self, owners: dict[int, list[nn.Module]], shards: Sequence[RowShard]) -> None:
        by_weight: dict[int, list[RowShard]] = {}
        for s in shards:
            if id(s.weight) in owners:
                by_weight.setdefault(id(s.weight), []).append(s)
        self._mode = _RowMode({k: tuple(v) for k, v in by_weight.items()})
        self._modules = list({id(m): m for k in by_weight for m in owners[k]}.values())

    def install(self) -> None:
        """Wraps each module's forward in the row-gradient mode."""
        for module in self._modules:
            vars(module)["forward"] = _Forward(module, self._mode)

    def remove(self) -> None:
        """Gives each module its own forward back (idempotent)."""
        for module in self._modules:
            if isinstance(vars(module).get("forward"), _Forward):
                del vars(module)["forward"]


class _Forward:
    """``module``'s own forward, run under ``mode`` (none: as it is)."""

    def __init__(self, module: nn.Module, mode: TorchFunctionMode | None = None) -> None:
        self.module = module
        self.mode = mode

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = type(self.module).forward
        if self.mode is None:
            return forward(self.module, *args, **kwargs)
        with self.mode:
            return forward(self.module, *args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        # copy.deepcopy and pickle: the copy of the module runs its forward as it is. Under this
        # mode its weight's gradient would go to the shards of the optimizer, not to the copy.
        return (_Forward, (self.module,))


class _RowMode(TorchFunctionMode):
    """Routes ``F.linear`` / ``F.embedding`` on a sharded weight to the row-gradient functions."""

    def __init__(self, shards: dict[int, tuple[RowShard, ...]]) -> None:
        super().__init__()
        self.shards = shards

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = _linear_call(*args, **kwargs)
            shards = self.shards.get(id(weight))
            if shards is not None:
                spans, params = _spans(shards), _params(shards)
                return _RowLinear.apply(x, weight.detach(), bias, spans, *params)
        elif func is F.embedding:
            ids, weight, padding = _embedding_call(*args, **kwargs)
            shards = self.shards.get(id(weight))
            if shards is not None and padding is not None:
                spans, params = _spans(shards), _params(shards)
                return _RowEmbedding.apply(ids, weight.detach(), padding[0], spans, *params)
        return func(*args, **kwargs)


def _linear_call(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    return input, weight, bias


def _embedding_call(
    input: torch.Tensor,
    weight: torch.Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int | None] | None]:
    """``(ids, weight, (padding_idx,))``; ``None`` in place of the last for options whose
    gradient is not a plain row sum (left to autograd)."""
    if max_norm is not None or scale_grad_by_freq or sparse:
        return input, weight, None
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    return input, weight, (padding_idx,)


def _spans(shards: Sequence[RowShard]) -> Spans:
    return tuple((s.start, s.stop) for s in shards)


def _params(shards: Sequence[RowShard]) -> list[torch.Tensor]:
    return [s.param for s in shards]


class _RowLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)``; backward: the input's and bias's gradients, and for each
    span the gradient of those rows of ``weight`` only, to the matching shard parameter.

    Under autocast the backward runs under the forward's autocast state, as
    ``torch.amp.custom_bwd`` would arrange (the decorator is bound to one device type; this
    function runs on whichever device its input is on): so the LM head's backward multiplies in
    bf16 or fp16 like ``nn.Linear``'s, not in the fp32 of the weight.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spans: Spans,
        *shards: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.spans = spans
        ctx.dtypes = [s.dtype for s in shards]
        ctx.device_type = x.device.type
        ctx.autocast = _autocast_dtype(x.device.type)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        autocast = (
            torch.autocast(ctx.device_type, dtype=ctx.autocast)
            if ctx.autocast is not None
            else contextlib.nullcontext()
        )
        with autocast:
            grad_x = grad_bias = None
            if ctx.needs_input_grad[0]:
                grad_x = (grad.to(weight.dtype) @ weight).to(x.dtype)
            if ctx.needs_input_grad[2]:
                grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
            rows = grad.reshape(-1, grad.shape[-1])
            inputs = x.reshape(-1, x.shape[-1]).to(grad.dtype)
            grads = [
                (rows[:, a:b].t() @ inputs).to(dtype)
                for (a, b), dtype in zip(ctx.spans, ctx.dtypes, strict=True)
            ]
        return grad_x, None, grad_bias, None, *grads


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in effect on ``device_type``; ``None``: off (or none there: ``meta``)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type autocast does not know
        pass
    return None


class _RowEmbedding(torch.autograd.Function):
    """``F.embedding(ids, weight, padding_idx)``; backward: for each span the gradient of those
    rows of ``weight`` only (the padding row gets none, as in ``nn.Embedding``)."""

    @staticmethod
    def forward(
        ctx: Any,
        ids: torch.Tensor,
        weight: torch.Tensor,
        padding_idx: int | None,
        spans: Spans,
        *shards: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.spans = spans
        ctx.padding_idx = padding_idx
        ctx.dtypes = [s.dtype for s in shards]
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (ids,) = ctx.saved_tensors
        ids = ids.reshape(-1)
        # Half-precision rows are summed in fp32 and rounded once, as PyTorch's own embedding
        # backward does: index_add_ on CUDA adds in the tensor's dtype, where the sum of a frequent
        # token's rows stops growing (in bf16, 256 + 1 == 256).
        rows = grad.reshape(-1, grad.shape[-1])
        if rows.dtype in (torch.float16, torch.bfloat16):
            rows = rows.float()
        grads = []
        for (a, b), dtype in zip(ctx.spans, ctx.dtypes, strict=True):
            # Ids outside the span, and the padding id, add into a spare last row, dropped after:
            # boolean indexing would size its result by the data and so wait for the device.
            index = ids - a
            outside = (index < 0) | (index >= b - a)
            if ctx.padding_idx is not None:
                outside |= ids == ctx.padding_idx
            out = rows.new_zeros(b - a + 1, rows.shape[-1])
            out.index_add_(0, index.masked_fill_(outside, b - a), rows)
            grads.append(out[: b - a].to(dtype))
        return None, None, None, None, *grads
