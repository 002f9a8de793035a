"""One HiFTOptimizer per model at a time: what an optimizer changed on its model, and undoing it.

A HiFTOptimizer freezes all groups but one and hooks the model's blocks. Two live optimizers on one
model would fight over ``requires_grad``, so a new optimizer takes the model over: the old one is
closed (with a warning) and refuses to step from then on. An optimizer dropped without ``close()``
(a notebook cell re-run, say) would leave its freezing and hooks behind. The registry here remembers, per model,
a :class:`Claim` that can undo those changes without the optimizer that made them.

A copy of a driven model (``copy.deepcopy``, or ``torch.save`` and ``torch.load``) is a plain model:
every parameter the optimizer manages trainable, no backward-truncation hooks, no optimizer. The
claim puts a :class:`CopyGuard` on the model for that: copying and pickling reach it with the rest
of the model, and it makes the copy's parameters trainable and removes the copy's hooks (the copy
keeps only an inert hook in its place).
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from .truncation import BackwardTruncation

#: The :class:`Claim` of each model a HiFTOptimizer drives. Kept beside the model, not on it,
#: so that pickling or deep-copying a model never meets the weak reference inside.
_CLAIMS: weakref.WeakKeyDictionary[nn.Module, Claim] = weakref.WeakKeyDictionary()


class Claim:
    """What a HiFTOptimizer changed on its model, so it can be undone without the optimizer.

    Holds the optimizer weakly: a model kept alive after its optimizer was dropped must not keep
    the old optimizer's state alive too.

    Args:
        owner: The optimizer driving the model (held weakly; its ``repr`` names it in errors).
        truncation: The backward-truncation hooks it registered on the model.
        params: The parameters it froze and unfreezes one group at a time.
    """

    def __init__(
        self, owner: object, truncation: BackwardTruncation, params: list[nn.Parameter]
    ) -> None:
        self.owner = weakref.ref(owner)
        self.truncation = truncation
        self.params = params
        self.released = False
        #: Set when a newer optimizer took the model over: the owner must refuse to step.
        self.superseded = False
        self._guard: RemovableHandle | None = None

    def guard_copies(self, model: nn.Module) -> None:
        """Puts a :class:`CopyGuard` on ``model`` (removed by :meth:`release`)."""
        # A state-dict pre-hook: a slot that copying and pickling visit and that forward never
        # runs (nothing for torch.compile to trace).
        self._guard = model.register_state_dict_pre_hook(CopyGuard(self.params, self.truncation))

    def release(self) -> None:
        """Removes the hooks and makes the parameters trainable again (once)."""
        if not self.released:
            if self._guard is not None:
                self._guard.remove()
            self.truncation.remove()
            for p in self.params:
                p.requires_grad_(True)
            self.released = True


class CopyGuard:
    """Makes a copy or an unpickled copy of a driven model a plain model; does nothing else.

    Its ``__reduce__`` (which both ``copy.deepcopy`` and ``pickle`` use) hands the managed
    parameters and the truncation hooks to :func:`_plain_copy`, through the copier's memo, so that
    it receives the very copies the copied model holds.

    Args:
        params: The parameters the optimizer freezes and unfreezes.
        truncation: Its backward-truncation hooks.
    """

    def __init__(self, params: list[nn.Parameter], truncation: BackwardTruncation) -> None:
        self.params = params
        self.truncation = truncation

    def __call__(self, module: nn.Module, prefix: str, keep_vars: bool) -> None:
        return None

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return _plain_copy, (self.params, self.truncation)


def _plain_copy(params: list[nn.Parameter], truncation: BackwardTruncation) -> Callable[..., None]:
    """Undoes a copied claim on the copied tensors; returns the copy's (inert) state-dict hook."""
    truncation.remove()
    for p in params:
        p.requires_grad_(True)
    return _copied


def _copied(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    """What a copy of a driven model keeps of its :class:`CopyGuard`: a hook that does nothing."""


def claim_model(
    model: nn.Module, owner: object, truncation: BackwardTruncation, params: list[nn.Parameter]
) -> Claim:
    """Records that ``owner`` now drives ``model`` (after :func:`release_stale_claim` let it).

    Returns:
        The new :class:`Claim`, for :func:`release_claim` when the owner closes.
    """
    claim = Claim(owner, truncation, params)
    claim.guard_copies(model)
    _CLAIMS[model] = claim
    return claim


def release_claim(model: nn.Module, claim: Claim) -> None:
    """Undoes ``claim`` and forgets it, unless another claim has replaced it since."""
    claim.release()
    if _CLAIMS.get(model) is claim:
        del _CLAIMS[model]


def release_stale_claim(model: nn.Module) -> None:
    """Takes ``model`` over from a live HiFTOptimizer (closing it); undoes a dropped, unclosed one.

    Both cases warn. Call it straight from the optimizer's ``__init__``: the warning points two
    frames up, at the user's line that builds the optimizer.
    """
    claim = _CLAIMS.get(model)
    if claim is None or claim.released:
        return
    if claim.owner() is not None:
        gc.collect()  # a dropped optimizer caught in a reference cycle is freed only by the collector
    owner = claim.owner()
    if owner is not None:
        # A re-run notebook cell or a sweep over units_per_group on one model: the newest
        # optimizer wins. Closing the old one undoes its freezing and hooks and gives the
        # weights their dtypes back; its step() then says why it no longer works.
        warnings.warn(
            f"this model was driven by {owner!r}; the new HiFTOptimizer takes it over and the "
            "old one is closed (stepping it raises)",
            stacklevel=3,
        )
        claim.superseded = True
        try:
            owner.close()  # type: ignore[attr-defined]
        finally:
            release_claim(model, claim)
        return
    # Its optimizer is gone without close(): without this, all but one group would stay frozen
    # and its backward-truncation hooks would keep cutting the graph.
    warnings.warn(
        "the model's previous HiFTOptimizer was dropped without close(); undoing its freezing "
        "and hooks before wrapping the model again",
        stacklevel=3,
    )
    claim.release()
    del _CLAIMS[model]
