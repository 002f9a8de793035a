"""One forward pass, watched: when each block runs and when each parameter is first used.

The unit split (:mod:`.units`) places a parameter by where it *runs* relative to the blocks, not by
where it is registered: BART registers its embedding layer norm after the layers but uses it before
them, and an encoder-decoder runs a whole second stack of blocks after the first. This module
finds that out by running the model once on a tiny dummy input (:mod:`.dummy`: token ids,
pixels, a spectrogram or a waveform, whatever the model takes):

* first on a ``meta`` copy of the model (shapes only: no memory, no compute, the user's model is
  not even called);
* if that fails (data-dependent code such as mixture-of-experts routing cannot run on ``meta``),
  on the model itself, under ``torch.no_grad()`` in eval mode with a forked RNG, restoring every
  module's training flag and removing every hook afterwards, so no weight, buffer or RNG changes;
* if that fails too (an input the model does not take), :func:`trace_forward` returns ``None``
  and the caller falls back to registration order.

A model already sharded with FSDP2 (``DTensor`` parameters) can take neither path: it cannot be
deep-copied, and a pass outside its training loop leaves FSDP2's state broken (the first training
step then crashes). It is refused: split it before sharding (:func:`hiftune.engine.fsdp.pin_units`).

A parameter counts as *used* when it is an argument of a torch operation (a
:class:`~torch.overrides.TorchFunctionMode` sees every one); reading its shape, dtype or device
does not count. Nothing here imports ``transformers``: Hugging Face models are recognised by duck
typing (``config.vocab_size``, ``get_input_embeddings``, the forward signature).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .dummy import dummy_calls

logger = logging.getLogger(__name__)

#: Tensor methods that read metadata only: a parameter passed to them is not *used*.
_METADATA = frozenset(
    {
        "__get__",
        "size",
        "dim",
        "numel",
        "nelement",
        "stride",
        "data_ptr",
        "element_size",
        "is_floating_point",
        "is_complex",
        "is_contiguous",
        "get_device",
        "__len__",
        "__hash__",
        "__eq__",
        "__format__",
        "__repr__",
    }
)

#: What a meta tensor cannot answer (see :class:`MetaAnswers`).
_TRUTH = (torch.Tensor.__bool__, torch.Tensor.item)


@dataclass(frozen=True)
class Trace:
    """What one forward pass showed, in event ticks (a counter over operations and block calls).

    Attributes:
        blocks: The block paths in the order their first call started.
        first_start: Tick of each block's first call (pre-hook).
        last_start: Tick of each block's last call: a block called again later (a shared block)
            must not be cut off from anything used before that later call.
        first_use: Tick of each parameter's first use, by name (absent: not used in this pass).
        device: ``"meta"`` or the device the model ran on.
    """

    blocks: tuple[str, ...]
    first_start: dict[str, int]
    last_start: dict[str, int]
    first_use: dict[str, int]
    device: str


def trace_forward(model: nn.Module, block_paths: Sequence[str]) -> Trace | None:
    """Runs ``model`` once on a dummy input and records the blocks' and parameters' timing.

    Args:
        model: The model (on any device, ``meta`` included).
        block_paths: Dotted paths of its block modules.

    Returns:
        The :class:`Trace`, or ``None`` if neither a ``meta`` copy nor the model itself could run
        on a dummy input, or if some block was never called.

    Raises:
        ValueError: If the model's parameters are ``DTensor`` shards (FSDP2's ``fully_shard``).
    """
    if _holds_dtensors(model):
        raise ValueError(
            f"{type(model).__name__} is sharded already (DTensor parameters, e.g. FSDP2's "
            "fully_shard), so HiFT cannot trace it to split it into units: split it before "
            "sharding with hiftune.engine.fsdp.pin_units (or shard it with shard_by_units) and "
            "build the optimizer with the config it returns"
        )
    errors = []
    for runner in (_run_on_meta_copy, _run_in_place):
        try:
            trace = runner(model, block_paths)
        except Exception as e:  # any failure of a dummy forward means: no trace, fall back
            errors.append(f"{runner.__name__}: {type(e).__name__}: {e}")
            continue
        if trace is not None and len(trace.blocks) == len(block_paths):
            return trace
        errors.append(f"{runner.__name__}: some blocks were not called")
    logger.info(
        "could not trace a forward pass of %s (%s); units follow registration order",
        type(model).__name__,
        "; ".join(e.splitlines()[0][:200] for e in errors),
    )
    return None


def _holds_dtensors(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (FSDP2 and tensor parallelism)."""
    if not torch.distributed.is_available():  # a torch build without distributed: none can be
        return False
    from torch.distributed.tensor import DTensor  # imported only when it exists

    return any(isinstance(p, DTensor) or isinstance(p.data, DTensor) for p in model.parameters())


def _run_on_meta_copy(model: nn.Module, block_paths: Sequence[str]) -> Trace | None:
    meta_model = model
    if any(p.device.type != "meta" for p in model.parameters()):
        # Deep-copy the module tree with every parameter and buffer replaced by a meta tensor of
        # the same shape (via deepcopy's memo), so no weight is copied and ties stay ties.
        memo: dict[int, Any] = {}
        for p in model.parameters():
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
        for b in model.buffers():
            memo[id(b)] = torch.empty_like(b, device="meta")
        meta_model = copy.deepcopy(model, memo)
        for m in meta_model.modules():
            # The user's hooks (a logger, a previous optimizer's) must not run for a dummy pass.
            for hooks in (m._forward_pre_hooks, m._forward_hooks, m._backward_hooks):
                hooks.clear()
    return _run(meta_model, block_paths, torch.device("meta"))


def _run_in_place(model: nn.Module, block_paths: Sequence[str]) -> Trace | None:
    first = next(model.parameters(), None)
    if first is None or first.device.type == "meta":
        return None  # a meta model that could not run on meta cannot run at all
    with torch.random.fork_rng(devices=[]):
        return _run(model, block_paths, first.device)


def _run(model: nn.Module, block_paths: Sequence[str], device: torch.device) -> Trace | None:
    """The first dummy call (:func:`.dummy.dummy_calls`) that runs and calls every block.

    Returns the trace of the last call that ran if none called every block, ``None`` if there is
    no call to make; raises the last call's error if none ran.
    """
    trace, error = None, None
    for call in dummy_calls(model, device):
        try:
            trace = _watch(model, block_paths, call, device)
        except Exception as e:  # the next call may take fewer inputs
            error = e
            continue
        if len(trace.blocks) == len(block_paths):
            return trace
    if trace is None and error is not None:
        raise error
    return trace


def _eager() -> Any:
    """Runs compiled code eagerly (``torch.compiler.set_stance`` is torch >= 2.6)."""
    if hasattr(torch.compiler, "set_stance"):
        return torch.compiler.set_stance("force_eager")
    return torch._dynamo.config.patch(disable=True)


def _watch(
    model: nn.Module, block_paths: Sequence[str], call: Callable[[], Any], device: torch.device
) -> Trace:
    names = {id(p): n for n, p in model.named_parameters()}
    tick = [0]
    first_start: dict[str, int] = {}
    last_start: dict[str, int] = {}
    first_use: dict[str, int] = {}

    def on_start(path: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            first_start.setdefault(path, tick[0])
            last_start[path] = tick[0]
            tick[0] += 1

        return hook

    training = {m: m.training for m in model.modules()}
    handles = [
        model.get_submodule(path).register_forward_pre_hook(on_start(path)) for path in block_paths
    ]
    try:
        model.eval()
        # A compiled model (torch.compile) runs eagerly here: under dynamo the mode does not see
        # the operations in the order they run (a tied embedding looked first used after the
        # blocks, so its rows went to the head's group and lost the lookup's gradient).
        with (
            torch.no_grad(),
            _eager(),
            _Uses(names, first_use, tick),
        ):
            call()
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.training = flag
    order = tuple(sorted(first_start, key=first_start.__getitem__))
    return Trace(order, first_start, last_start, first_use, device.type)


class MetaAnswers(TorchFunctionMode):
    """Answers a meta tensor's value queries (``bool()``, ``.item()``) with "yes".

    A meta tensor has no values. A model asks for one only to pick a shortcut (is the mask all
    ones, is the batch packed) or to check its input (``torch._check``: as many image tokens as
    image features); for a dummy input (no padding, one sequence, the right count) the answer is
    "yes", and no answer changes which parameters run or what autograd saves. Other operations
    run unchanged. The memory tools' one-pass checks on ``meta`` run under it too.
    """

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func in _TRUTH and args and getattr(args[0], "is_meta", False):
            return _yes(args[0]) if func is torch.Tensor.item else True
        return func(*args, **(kwargs or {}))


class _Uses(MetaAnswers):
    """Records the first tick at which each watched parameter is an argument of an operation."""

    def __init__(self, names: dict[int, str], first_use: dict[str, int], tick: list[int]) -> None:
        super().__init__()
        self._names = names
        self._first_use = first_use
        self._tick = tick

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in _METADATA:
            for value in tree_flatten((args, kwargs))[0]:
                name = self._names.get(id(value)) if isinstance(value, nn.Parameter) else None
                if name is not None and name not in self._first_use:
                    self._first_use[name] = self._tick[0]
        self._tick[0] += 1
        return super().__torch_function__(func, types, args, kwargs)


def _yes(tensor: torch.Tensor) -> bool | int | float:
    """ "Yes" as the Python scalar ``tensor.item()`` would give (``_check`` wants a ``bool``)."""
    if tensor.dtype == torch.bool:
        return True
    return 1.0 if tensor.is_floating_point() or tensor.is_complex() else 1
