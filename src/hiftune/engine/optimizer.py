"""HiFTOptimizer: turns any ``torch.optim.Optimizer`` class into a hierarchical full-parameter tuner.

One instance of the user's optimizer class is built per group, over that group's parameters only,
so each group keeps its own state (its own Adam step count, say) and no optimizer code is copied
or patched. Each :meth:`HiFTOptimizer.step` then

1. brings the active group's optimizer state (and fp32 masters) back from the store,
2. steps that group's optimizer (on the fp32 masters in mixed precision),
3. pages the state back out, freezes the group and unfreezes the next one in the queue.

Freezing everything but the active group is what truncates backward (see :mod:`.truncation`).
The delayed scheduler lives in :mod:`.schedule.delay`, the one-optimizer-per-model bookkeeping in
:mod:`.claims`, the gradient all-reduce in :mod:`.distributed`, the paging in :mod:`.state.paging`, the
row shards of a split parameter in :mod:`.shards`, taking the model over and handing it back
(masters, casts, trainability) in :mod:`.handover`, the state dict in :mod:`.checkpoint`, and what
makes the optimizer refuse to go on (closed, diverged, the model changed under it) in :mod:`.guards`.
"""

from __future__ import annotations

import logging
from collections import ChainMap
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .checkpoint import Checkpoint
from .claims import claim_model, release_claim, release_stale_claim
from .config import HiFTConfig
from .distributed import all_reduce_mean, should_sync
from .guards import NOT_COPYABLE, DivergedError, Lifecycle, Placement
from .handover import Handover, open_states
from .rowgrad import row_gradient_owners
from .schedule.delay import DelayedLR
from .schedule.rotation import split_groups
from .shards import GroupTensors, take_grads
from .split.units import Unit, group_name
from .state import precision
from .state.inner import ParamGroupsFn
from .state.precision import DTYPES, LossScaler
from .state.state_dict import STATE_DICT_VERSION
from .state.store import StateStore
from .state.zero import StateSharding
from .truncation import BackwardTruncation

logger = logging.getLogger(__name__)

__all__ = ["STATE_DICT_VERSION", "HiFTOptimizer"]


class HiFTOptimizer(torch.optim.Optimizer):
    """Hierarchical full-parameter fine-tuning around any PyTorch optimizer.

    Exactly one group of units is trainable at a time; every :meth:`step` updates it and moves on
    to the next group in the queue. Use it like any optimizer::

        opt = HiFTOptimizer(model, torch.optim.AdamW, HiFTConfig(units_per_group=1), lr=2e-5)
        sched = opt.delay(torch.optim.lr_scheduler.LambdaLR(opt, lambda cycle: 1 - cycle / 100))
        for batch in loader:
            model(**batch).loss.backward()
            opt.step(); sched.step(); opt.zero_grad()

    ``param_groups`` holds one entry per HiFT group (in training order), so stock LR schedulers
    work; :meth:`delay` makes a scheduler advance once per cycle, as HiFT prescribes.

    Args:
        model: The model to train. Its trainable parameters (``requires_grad=True`` at
            construction) are split into groups; the optimizer toggles ``requires_grad`` from then on.
        optimizer_cls: Any ``torch.optim.Optimizer`` subclass (or a callable with the same
            signature), e.g. ``torch.optim.AdamW`` or ``transformers.optimization.Adafactor``.
        config: How to split, order, page and cast; defaults to :class:`HiFTConfig()`.
        param_groups_fn: Optional per-parameter options: receives one group's ``(name, param)``
            pairs and returns torch param-group dicts for them (e.g. weight decay 0 for biases and
            norms). By default each HiFT group is one param group.
        store: Optional :class:`~hiftune.engine.state.store.StateStore` to hold inactive groups' state,
            instead of the one ``config.offload`` names (e.g. a store of your own, or a
            ``DiskStore(write_behind=True)``).
        **optimizer_kwargs: Passed unchanged to ``optimizer_cls`` for every group.

    A unit may hold only some rows of a parameter (``HiFTConfig.max_unit_params``): its group's
    optimizer then steps a row shard, an ``nn.Parameter`` viewing those rows (see
    :mod:`hiftune.engine.shards`, also for what a sharded step costs).

    The schedule options (:mod:`hiftune.engine.schedule.rotation`): with ``HiFTConfig.steps_per_group`` K
    each group takes K steps before the next one becomes active; the parameters
    ``HiFTConfig.always_active`` names are trained at every step by one more optimizer (same
    class and arguments, learning rate times ``always_active_lr_scale``) whose state is never
    paged. Its param groups come last in :attr:`param_groups`, after the rotating groups'.

    Attributes:
        groups: Parameter names of each group, in training order (a sharded parameter is named in
            every group that holds some of its rows).
        group_names: A readable name per group, e.g. ``["embed", "layers.0", ..., "head"]``.
        units: The rotating units of the model, bottom-up.
        always_unit: The unit of the always-active parameters, or ``None``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer_cls: Callable[..., torch.optim.Optimizer],
        config: HiFTConfig | None = None,
        *,
        param_groups_fn: ParamGroupsFn | None = None,
        store: StateStore | None = None,
        **optimizer_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(optimizer_cls) or isinstance(optimizer_cls, torch.optim.Optimizer):
            raise TypeError(
                "optimizer_cls must be an optimizer class such as torch.optim.AdamW (not an "
                f"instance), got {optimizer_cls!r}"
            )
        self.config = config if config is not None else HiFTConfig()
        self.model = model
        release_stale_claim(model)
        split = split_groups(model, self.config)
        self.units: list[Unit] = split.units
        self.always_unit: Unit | None = split.always
        named = dict(model.named_parameters())
        # The units of each group, bottom-up. Everything per group below is indexed the same way
        # (by bottom-up group id b); self._rotation maps training positions to ids.
        bottom_up = split.groups
        self._group_units: list[tuple[Unit, ...]] = bottom_up
        self._rotation = split.rotation(self.config)
        # The always-active parameters are one more group, id k (after the rotating ones): built,
        # cast, saved and handed back like the others, but never paged and never frozen.
        self._always = None if split.always is None else len(bottom_up)
        every = split.every
        owners = row_gradient_owners(model)
        self._tensors = [GroupTensors.build(named, g, owners) for g in every]
        self._names = [t.names for t in self._tensors]
        # What each group's optimizer steps in the model's dtype (a row shard for some rows).
        self._params = [t.params for t in self._tensors]
        self._mixed = self.config.precision != "fp32"
        self._dtype = DTYPES[self.config.precision]
        self._scaler = (
            LossScaler(self.config.init_loss_scale, self.config.loss_scale_growth_interval)
            if self.config.precision == "fp16"
            else None
        )
        # Each group's inner optimizer and fp32 masters (empty in fp32 training), paged together.
        self._states, self._sharding = open_states(
            self.config,
            store,
            self._tensors,
            named,
            [group_name(g) for g in every],
            pinned=() if self._always is None else (self._always,),
        )
        self._store: StateStore = self._states.store
        self._inner = self._states.inner
        self._masters = self._states.masters
        self._grads_ready = False
        # A failed construction hands the model back as it found it (see .handover).
        self._handover = Handover(model, self._tensors, self._states, self._store, self._dtype)
        self._handover.build(optimizer_cls, param_groups_fn, optimizer_kwargs)
        if self._always is not None:
            for g in self._inner[self._always].param_groups:
                if "lr" in g:  # schedulers take their base rates from here, scaled
                    g["lr"] = g["lr"] * self.config.always_active_lr_scale

        super().__init__(self._collect_param_groups(), dict(self._inner[0].defaults))
        self._checkpoint = Checkpoint(
            self._tensors,
            self._states,
            self._rotation,
            group_names=[group_name(g) for g in every],
            precision=self.config.precision,
            scaler=self._scaler,
            sharding=self._sharding,
            always=self._always,
        )
        # What each step checks the model still is: the dtypes and devices built for (cast above).
        self._placement = Placement(model, self._tensors, self.config.precision)
        weights = list({id(w): w for t in self._tensors for w in t.weights}.values())
        self._truncation = BackwardTruncation(model, self.units)
        # Closed, superseded, or stopped by an fp16 divergence until a checkpoint loads.
        self._life = Lifecycle(claim_model(model, self, self._truncation, weights))
        self._activate()

    # --- the public surface -----------------------------------------------------------------

    @property
    def groups(self) -> list[list[str]]:
        """Parameter names of each rotating group, in training order."""
        return [list(self._names[b]) for b in self._rotation.order]

    @property
    def group_names(self) -> list[str]:
        """A readable name per rotating group, in training order."""
        return [group_name(self._group_units[b]) for b in self._rotation.order]

    @property
    def always_active_names(self) -> list[str]:
        """The parameters trained at every step (``HiFTConfig.always_active``), by name."""
        return [] if self._always is None else list(self._names[self._always])

    @property
    def active_group(self) -> int:
        """Index into :attr:`groups` of the group the next :meth:`step` trains."""
        return self._rotation.position

    @property
    def num_groups(self) -> int:
        """k, the number of rotating groups."""
        return len(self._rotation.order)

    @property
    def steps_per_cycle(self) -> int:
        """``k * K``: the optimizer steps of one cycle (``K = HiFTConfig.steps_per_group``)."""
        return self._rotation.steps_per_cycle

    @property
    def cycle(self) -> int:
        """The number of completed cycles (each group visited once per cycle)."""
        return self._rotation.cycle

    @property
    def steps(self) -> int:
        """The number of optimizer steps taken (fp16 steps skipped on overflow not counted)."""
        return self._rotation.steps

    @property
    def loss_scale(self) -> float:
        """The current fp16 loss scale (1.0 unless ``precision="fp16"``)."""
        return self._scaler.scale if self._scaler else 1.0

    @property
    def skipped_steps(self) -> int:
        """How many fp16 steps were skipped because of overflowing gradients."""
        return self._scaler.skipped_steps if self._scaler else 0

    # torch declares ``state`` a plain dict attribute; here it is a view over the groups' states.
    @property  # type: ignore[override]
    def state(self) -> Mapping[torch.Tensor, dict[str, Any]]:
        """Optimizer state of the groups currently on the device (a read-only view)."""
        # Plain copies: a lookup in the inner defaultdicts would add an empty entry.
        return ChainMap(*(dict(inner.state) for inner in self._inner))

    @state.setter
    def state(self, value: Any) -> None:
        # torch.optim.Optimizer.__init__ assigns an empty state; the real state lives per group.
        if value:
            raise AttributeError("HiFTOptimizer.state is a view of the per-group optimizers")

    @property
    def sharding(self) -> StateSharding | None:
        """Which rank keeps each group's state, with ``shard_state=True`` on several ranks.

        Then :meth:`state_dict` is a collective: call it on every rank, save rank 0's (whole).
        """
        return self._sharding

    @property
    def store(self) -> StateStore:
        """Where inactive groups' optimizer state (and fp32 masters) live."""
        return self._store

    def active_parameters(self) -> list[nn.Parameter]:
        """The model parameters trained by the next step (the only ones with gradients): the
        active group's, then the always-active ones.

        A sharded parameter is listed whole: until :meth:`unscale_` hands the group's rows to its
        row shards, its gradient covers all its rows.
        """
        return [w for b in self._stepped() for w in self._tensors[b].weights]

    def master_parameters(self) -> list[nn.Parameter]:
        """The tensors the next step updates: the active group's, then the always-active ones.

        In mixed precision these are fp32 master weights: after :meth:`unscale_` they hold the
        unscaled fp32 gradients (for clipping or logging of your own); outside a step the active
        group's are paged out to the store (empty tensors). In fp32 training they are the
        parameters of :meth:`active_parameters`, with a row shard in place of a sharded one.
        """
        source = self._masters if self._mixed else self._params
        return [p for b in self._stepped() for p in source[b]]

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Returns ``loss`` times the fp16 loss scale; call ``.backward()`` on the result.

        With ``precision="fp16"`` gradients must be computed from a scaled loss so that small
        values survive in half precision; :meth:`step` unscales them. Otherwise returns ``loss``.
        """
        return loss * self._scaler.scale if self._scaler else loss

    def delay(self, scheduler: Any) -> DelayedLR:
        """Wraps ``scheduler`` so that it advances once per HiFT cycle (delayed learning rate).

        Args:
            scheduler: Any LR scheduler built on this optimizer (e.g. ``LambdaLR(opt, ...)``).
                Its warm-up and length are then counted in cycles.
        """
        if getattr(scheduler, "optimizer", self) is not self:
            raise ValueError("the scheduler must be built on this HiFTOptimizer")
        return DelayedLR(scheduler, self)

    def unscale_(self) -> None:
        """Makes the active group's gradients final: synchronised across ranks, and unscaled.

        In distributed runs (``torch.distributed`` initialised, more than one process, and
        :attr:`HiFTConfig.sync_gradients` not ``False``) the active group's gradients are averaged
        over all ranks here (see :mod:`.distributed`). In mixed precision the half-precision
        gradients are then copied into the fp32 masters and the loss scale divided out. Call it
        before clipping if you clip yourself (:meth:`clip_grad_norm_` does); :meth:`step` calls it
        when you did not. Idempotent until the next step.
        """
        if self._grads_ready:
            return
        stepped = self._stepped()
        self._placement.check(stepped)  # before anything changes
        # Row shards take their rows of the full gradient first (freeing it), so that only the
        # active rows are all-reduced and paged-in state never meets the full-size gradient.
        take_grads(self._tensors[stepped[0]].shards)
        if should_sync(self.config.sync_gradients):
            all_reduce_mean([p for b in stepped for p in self._params[b] if p.requires_grad])
        if self._mixed:
            for b in stepped:
                self._states.page_in(b)
                precision.grads_to_masters(self._params[b], self._masters[b], self.loss_scale)
        self._grads_ready = True

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clips the gradient norm of the active group (unscaled, on the fp32 masters if mixed).

        Returns:
            The total norm before clipping.
        """
        self.unscale_()
        return torch.nn.utils.clip_grad_norm_(
            self.master_parameters(), max_norm, norm_type=norm_type
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Updates the active group, then activates the next group in the queue.

        With gradient accumulation, call this once per optimizer step (not per micro-batch): the
        group switches only here. With ``precision="fp16"`` a step whose gradients overflow is
        skipped and the same group stays active for the next try.

        If paging the group's state out afterwards fails (a full disk, say), the error is raised
        but nothing is lost: the step counts, the next group becomes active, and the state stays
        in memory until a later step pages it out.

        Args:
            closure: Optional closure that re-evaluates the model and returns the loss.

        Returns:
            What ``closure`` returned, if given.

        Raises:
            DivergedError: With ``precision="fp16"``, if the step left fp32 master weights that
                fp16 cannot hold (beyond +-65504, or inf/nan): training diverged (a
                ``FloatingPointError``, and a ``UserError``: lower the learning rate). The model
                keeps its last weights, and this optimizer refuses to step or save until a
                :meth:`load_state_dict` restores a checkpoint.
            RuntimeError: If the model was cast, moved or had its parameters replaced since this
                optimizer was built (``model.half()``, ``model.cuda()``): build the optimizer
                after that, or ``close()`` this one first. Nothing changes before it is raised.
        """
        self._life.check()
        b = self._rotation.active
        stepped = self._stepped()
        loss = None
        if self._mixed and closure is not None:
            with torch.enable_grad():
                loss = closure()
            closure = None
        self.unscale_()
        self._states.page_in(b)
        if self._scaler is not None:
            overflow = self._scaler.found_overflow(
                m.grad for s in stepped for m in self._masters[s] if m.grad is not None
            )
            self._scaler.update(overflow)
            if overflow:  # the same group tries again with the next batch
                self._finish_step(None)
                return loss
        result = None
        if self._sharding is None or self._sharding.owns(b):
            result = self._inner[b].step(closure) if closure is not None else self._inner[b].step()
        elif closure is not None:  # another rank steps this group; its weights come below
            with torch.enable_grad():
                result = closure()
        if self._sharding is not None:
            self._sharding.broadcast(b, self._params[b])
        if self._always is not None:
            # Every rank steps it (its gradients were averaged): no owner, no broadcast.
            self._inner[self._always].step()
        loss = result if loss is None else loss
        if self._scaler is not None:
            # An fp16 weight of inf would overflow every later step: they would all be skipped.
            for s in stepped:
                self._life.failure = precision.check_half_range(
                    self._masters[s], self._dtype, self._states.names[s]
                )
                if self._life.failure is not None:
                    self._clear_grads()
                    raise DivergedError(self._life.failure)
        for s in stepped:
            self._tensors[s].write_back(self._masters[s])
        switch = self._rotation.advance()  # the update is done even if paging out fails below
        self._finish_step(b if switch else None)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients of every managed parameter (only the active group has any)."""
        for group in (*(t.weights for t in self._tensors), *self._params, *self._masters):
            for p in group:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()
        self._grads_ready = False

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: queue, order, cycle, and every group's state.

        Paged-out state is read back to CPU for the copy. The result holds only tensors and plain
        Python values, so ``torch.save`` / ``torch.load(weights_only=True)`` round-trip it.

        Raises:
            RuntimeError: After an fp16 divergence (see :meth:`step`): its state is not worth
                saving.
        """
        self._life.check()
        return self._checkpoint.save()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output into an optimizer built on an identical model.

        The whole dict is checked before anything changes, so a mismatch leaves this optimizer as
        it was. Loading also makes an optimizer usable again after an fp16 divergence.

        Raises:
            ValueError: If the checkpoint was saved for a different model, unit split, parameter
                shape, optimizer class or precision, or is damaged (a queue position or group
                order that does not fit, a group entry of the wrong form).
        """
        if self._life.closed:
            self._life.check()  # says why it is closed (e.g. a newer optimizer took over)
        self._checkpoint.load(state_dict)
        # Optimizer.load_state_dict replaces the group dicts; share the new ones again.
        self.param_groups = self._collect_param_groups()
        for tensors in self._tensors:
            tensors.deactivate()
        self._grads_ready = False
        self._life.failure = None
        self._activate()

    def close(self) -> None:
        """Hands the model back and frees the paging files; the optimizer is done afterwards.

        Removes the backward-truncation hooks and makes every parameter HiFT froze trainable
        again, so the model can be trained or wrapped again. With mixed precision the model's
        parameters get their dtypes back: the trained ones take their fp32 master weights (more
        precise than the half-precision weights trained with), the ones HiFT never trained are
        cast back (their values rounded to half precision once). So a model wrapped again with
        ``precision="fp32"`` trains fp32 weights. Calling ``close()`` again does nothing.
        """
        if self._life.closed:
            return
        self._life.closed = True
        # A diverged group's masters are skipped: its weights keep their last finite values.
        failed = self._rotation.active if self._life.failure is not None else None
        try:
            self._handover.hand_back(self._handover.trained_masters(skip=failed))
        finally:
            release_claim(self.model, self._life.claim)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # copy.copy, copy.deepcopy and pickle all come here: a copy would drive no model.
        raise TypeError(NOT_COPYABLE)

    def __repr__(self) -> str:
        inner = type(self._inner[0]).__name__
        return (
            f"HiFTOptimizer({inner}, {len(self.units)} units in {self.num_groups} groups, "
            f"order={self.config.order}, active={self.group_names[self.active_group]!r}, "
            f"cycle={self.cycle}, offload={self.config.offload}, precision={self.config.precision})"
        )

    # --- internals ---------------------------------------------------------------------------

    def _collect_param_groups(self) -> list[dict[str, Any]]:
        # The very dict objects of the per-group optimizers, in training order, so a scheduler
        # that writes param_groups[i]["lr"] reaches the optimizer that steps group i.
        ids = [*self._rotation.order, *([] if self._always is None else [self._always])]
        return [g for b in ids for g in self._inner[b].param_groups]

    def _stepped(self) -> list[int]:
        """The ids of the groups the next step updates: the active one, then the always-active."""
        b = self._rotation.active
        return [b] if self._always is None else [b, self._always]

    def _activate(self) -> None:
        b = self._rotation.active
        for s in self._stepped():
            self._tensors[s].activate()
        units = self._group_units[b]
        if self.always_unit is not None:
            units = (*units, self.always_unit)
        self._truncation.set_active(units)
        if self.config.prefetch:
            self._store.prefetch(b)

    def _clear_grads(self) -> None:
        for b in self._stepped():
            for p in (*self._tensors[b].weights, *self._params[b], *self._masters[b]):
                p.grad = None
        self._grads_ready = False

    def _finish_step(self, left: int | None) -> None:
        """Clears the step's gradients; when group ``left`` has ended its visit, pages its state
        out (it stays on the device for the K steps of a visit) and activates the next group."""
        self._clear_grads()
        if left is None:
            return
        try:
            self._states.page_out(left)
            # Groups whose page-out failed before stayed resident: try them again now.
            for other in sorted(self._states.resident - {left}):
                self._states.page_out(other)
        finally:
            self._tensors[left].deactivate()
            self._activate()
