"""HiFTOptimizer: turns any ``torch.optim.Optimizer`` class into a hierarchical full-parameter tuner.

One instance of the user's optimizer class is built per group, over that group's parameters only,
so each group keeps its own state (its own Adam step count, say) and no optimizer code is copied
or patched. Each :meth:`HiFTOptimizer.step` then

1. brings the active group's optimizer state (and fp32 masters) back from the store,
2. steps that group's optimizer (on the fp32 masters in mixed precision),
3. pages the state back out, freezes the group and unfreezes the next one in the queue.

Freezing everything but the active group is what truncates backward: with no trainable parameter
below the lowest active block, autograd builds no graph there. Forward pre-hooks on the blocks keep
that true when gradient checkpointing (which makes the embedding output require grad) is on.
"""

from __future__ import annotations

import gc
import logging
import warnings
import weakref
from collections import ChainMap
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from .config import HiFTConfig
from .order import group_order
from .paging import StateStore, make_store
from .precision import DTYPES, LossScaler
from .units import EMBED, HEAD, Unit, group_name, group_units, split_units

logger = logging.getLogger(__name__)

STATE_DICT_VERSION = 1

ParamGroupsFn = Callable[[list[tuple[str, nn.Parameter]]], list[dict[str, Any]]]


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
        store: Optional :class:`~hiftune.engine.paging.StateStore` to hold inactive groups' state,
            instead of the one ``config.offload`` names (e.g. a store of your own, or a
            ``DiskStore(write_behind=True)``).
        **optimizer_kwargs: Passed unchanged to ``optimizer_cls`` for every group.

    Attributes:
        groups: Parameter names of each group, in training order.
        group_names: A readable name per group, e.g. ``["embed", "layers.0", ..., "head"]``.
        units: The units of the model, bottom-up.
        cycle: The number of completed cycles (each group updated once per cycle).
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
        _release_stale_claim(model)
        self.units: list[Unit] = split_units(model, self.config)
        bottom_up = group_units(self.units, self.config.units_per_group)
        self._units: list[tuple[Unit, ...]] = bottom_up
        self._order = group_order(len(bottom_up), self.config.order, self.config.seed)
        named = dict(model.named_parameters())
        # Everything below is indexed by bottom-up group id; self._order maps positions to ids.
        self._names = [[n for u in g for n in u.params] for g in bottom_up]
        self._params = [[named[n] for n in names] for names in self._names]
        self._mixed = self.config.precision != "fp32"
        self._dtype = DTYPES[self.config.precision]
        self._scaler = (
            LossScaler(self.config.init_loss_scale, self.config.loss_scale_growth_interval)
            if self.config.precision == "fp16"
            else None
        )
        self._store: StateStore = (
            store if store is not None else make_store(self.config.offload, self.config.offload_dir)
        )
        self._scalars: list[dict[str, Any]] = [{} for _ in bottom_up]
        self._resident: set[int] = set()
        self._grads_ready = False
        self._position = 0
        self.cycle = 0
        self.steps = 0

        self._masters: list[list[nn.Parameter]] = []
        self._inner: list[torch.optim.Optimizer] = []
        for b, params in enumerate(self._params):
            if self._mixed:
                # One group at a time: build its fp32 masters, cast the model weights to half
                # precision, and page the masters out before the next group, so the device never
                # holds more than one group's masters.
                masters = [nn.Parameter(p.detach().to(torch.float32, copy=True)) for p in params]
                for p in params:
                    p.data = p.data.to(self._dtype)
                self._masters.append(masters)
            param_groups = _param_groups(
                list(zip(self._names[b], params, strict=True)),
                self._masters[b] if self._mixed else params,
                param_groups_fn,
            )
            self._inner.append(optimizer_cls(param_groups, **optimizer_kwargs))
            self._resident.add(b)
            # Some optimizers (Adagrad) create their state in __init__: page it out right away.
            self._page_out(b)
        if self._mixed:
            for p in model.parameters():  # frozen weights too, so every matmul sees one dtype
                if p.is_floating_point() and p.dtype != self._dtype:
                    p.data = p.data.to(self._dtype)

        super().__init__(self._collect_param_groups(), dict(self._inner[0].defaults))
        for params in self._params:
            for p in params:
                p.requires_grad_(False)
        self._truncation = _BackwardTruncation(model, self.units)
        self._claim = _Claim(self, [p for params in self._params for p in params])
        _CLAIMS[model] = self._claim
        self._activate()

    # --- the public surface -----------------------------------------------------------------

    @property
    def groups(self) -> list[list[str]]:
        """Parameter names of each group, in training order."""
        return [list(self._names[b]) for b in self._order]

    @property
    def group_names(self) -> list[str]:
        """A readable name per group, in training order."""
        return [group_name(self._units[b]) for b in self._order]

    @property
    def active_group(self) -> int:
        """Index into :attr:`groups` of the group the next :meth:`step` trains."""
        return self._position

    @property
    def num_groups(self) -> int:
        """k, the number of groups (= optimizer steps per cycle)."""
        return len(self._order)

    @property
    def loss_scale(self) -> float:
        """The current fp16 loss scale (1.0 unless ``precision="fp16"``)."""
        return self._scaler.scale if self._scaler else 1.0

    @property
    def skipped_steps(self) -> int:
        """How many fp16 steps were skipped because of overflowing gradients."""
        return self._scaler.skipped_steps if self._scaler else 0

    @property
    def state(self) -> Mapping[torch.Tensor, dict[str, Any]]:  # type: ignore[override]
        """Optimizer state of the groups currently on the device (a read-only view)."""
        return ChainMap(*(inner.state for inner in self._inner))

    @state.setter
    def state(self, value: Any) -> None:
        # torch.optim.Optimizer.__init__ assigns an empty state; the real state lives per group.
        if value:
            raise AttributeError("HiFTOptimizer.state is a view of the per-group optimizers")

    @property
    def store(self) -> StateStore:
        """Where inactive groups' optimizer state (and fp32 masters) live."""
        return self._store

    def active_parameters(self) -> list[nn.Parameter]:
        """The model parameters of the active group (the only ones with gradients)."""
        return list(self._params[self._order[self._position]])

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
        over all ranks here, in one flat all-reduce. In mixed precision the half-precision
        gradients are then copied into the fp32 masters and the loss scale divided out. Call it
        before clipping if you clip yourself (:meth:`clip_grad_norm_` does); :meth:`step` calls it
        when you did not. Idempotent until the next step.
        """
        if self._grads_ready:
            return
        b = self._order[self._position]
        if self._distributed():
            _all_reduce_mean([p for p in self._params[b] if p.requires_grad])
        if self._mixed:
            self._page_in(b)
            inv = 1.0 / self.loss_scale
            for p, m in zip(self._params[b], self._masters[b], strict=True):
                if p.grad is None:
                    m.grad = None
                    continue
                m.grad = p.grad.detach().to(torch.float32)
                p.grad = None  # the half-precision gradient is no longer needed
                if inv != 1.0:
                    m.grad.mul_(inv)
        self._grads_ready = True

    def _distributed(self) -> bool:
        if self.config.sync_gradients is False:
            return False
        dist = torch.distributed
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clips the gradient norm of the active group (unscaled, on the fp32 masters if mixed).

        Returns:
            The total norm before clipping.
        """
        self.unscale_()
        b = self._order[self._position]
        params = self._masters[b] if self._mixed else self._params[b]
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Updates the active group, then activates the next group in the queue.

        With gradient accumulation, call this once per optimizer step (not per micro-batch): the
        group switches only here. With ``precision="fp16"`` a step whose gradients overflow is
        skipped and the same group stays active for the next try.

        Args:
            closure: Optional closure that re-evaluates the model and returns the loss.

        Returns:
            What ``closure`` returned, if given.
        """
        b = self._order[self._position]
        loss = None
        if self._mixed and closure is not None:
            with torch.enable_grad():
                loss = closure()
            closure = None
        self._page_in(b)
        self.unscale_()
        if self._scaler is not None:
            overflow = self._scaler.found_overflow(
                m.grad for m in self._masters[b] if m.grad is not None
            )
            self._scaler.update(overflow)
            if overflow:
                self._finish_group(b)
                return loss
        result = self._inner[b].step(closure) if closure is not None else self._inner[b].step()
        loss = result if loss is None else loss
        if self._mixed:
            for p, m in zip(self._params[b], self._masters[b], strict=True):
                p.data.copy_(m.data)
        self._finish_group(b)
        self._advance()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients of every managed parameter (only the active group has any)."""
        for group in (*self._params, *self._masters):
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
        """
        groups = []
        for b, inner in enumerate(self._inner):
            paged_out = b not in self._resident
            if paged_out:  # fill the optimizer from a CPU copy, only for the duration of the copy
                self._fill_state(b, self._store.peek(b))
            groups.append(
                {
                    "optimizer": inner.state_dict(),
                    "masters": [m.data.to("cpu") for m in self._masters[b]]
                    if self._mixed
                    else None,
                }
            )
            if paged_out:
                self._clear_state(b)
        return {
            "hift": {
                "version": STATE_DICT_VERSION,
                "group_names": [group_name(g) for g in self._units],
                "groups": [list(n) for n in self._names],
                "order": list(self._order),
                "position": self._position,
                "cycle": self.cycle,
                "steps": self.steps,
                "precision": self.config.precision,
                "scaler": self._scaler.state_dict() if self._scaler else None,
            },
            "groups": groups,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output into an optimizer built on an identical model.

        Raises:
            ValueError: If the checkpoint was saved for a different model, unit split or
                precision.
        """
        if not isinstance(state_dict, Mapping) or "hift" not in state_dict:
            raise ValueError("not a HiFTOptimizer state dict (no 'hift' entry)")
        meta = state_dict["hift"]
        if meta.get("version") != STATE_DICT_VERSION:
            raise ValueError(f"unsupported HiFT state dict version {meta.get('version')!r}")
        if [list(n) for n in meta["groups"]] != self._names:
            raise ValueError(
                "this checkpoint was saved for a different model or unit split: its groups are "
                f"{meta['group_names']}, this optimizer's are "
                f"{[group_name(g) for g in self._units]}"
            )
        if meta["precision"] != self.config.precision:
            raise ValueError(
                f"this checkpoint was saved with precision={meta['precision']!r}, "
                f"this optimizer uses {self.config.precision!r}"
            )
        order = [int(i) for i in meta["order"]]
        if sorted(order) != list(range(len(self._units))):
            raise ValueError(f"corrupt HiFT state dict: order {order} is not a permutation")
        for b, saved in enumerate(state_dict["groups"]):
            self._store.get(b)  # drop what the store holds for this group
            self._clear_state(b)
            inner = self._inner[b]
            inner.load_state_dict(saved["optimizer"])  # casts state to each parameter's device
            if self._mixed:
                for m, data in zip(self._masters[b], saved["masters"], strict=True):
                    m.data = data.to(device=self._params[b][0].device, dtype=torch.float32)
            self._resident.add(b)
            self._page_out(b)
        # Optimizer.load_state_dict replaces the group dicts; share the new ones again.
        self.param_groups = self._collect_param_groups()
        for params in self._params:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        self._order = order
        self._position = int(meta["position"])
        self.cycle = int(meta["cycle"])
        self.steps = int(meta["steps"])
        if self._scaler is not None and meta["scaler"] is not None:
            self._scaler.load_state_dict(meta["scaler"])
        self._grads_ready = False
        self._activate()

    def close(self) -> None:
        """Hands the model back and frees the paging files; the optimizer is done afterwards.

        Removes the backward-truncation hooks and makes every parameter HiFT froze trainable
        again, so the model can be trained or wrapped again. (With mixed precision the model's
        weights stay in half precision.)
        """
        self._claim.release()
        if _CLAIMS.get(self.model) is self._claim:
            del _CLAIMS[self.model]
        self._store.close()

    def __repr__(self) -> str:
        inner = type(self._inner[0]).__name__
        return (
            f"HiFTOptimizer({inner}, {len(self.units)} units in {self.num_groups} groups, "
            f"order={self.config.order}, active={self.group_names[self._position]!r}, "
            f"cycle={self.cycle}, offload={self.config.offload}, precision={self.config.precision})"
        )

    # --- internals ---------------------------------------------------------------------------

    def _collect_param_groups(self) -> list[dict[str, Any]]:
        # The very dict objects of the per-group optimizers, in training order, so a scheduler
        # that writes param_groups[i]["lr"] reaches the optimizer that steps group i.
        return [g for b in self._order for g in self._inner[b].param_groups]

    def _step_params(self, b: int) -> list[torch.Tensor]:
        return [p for g in self._inner[b].param_groups for p in g["params"]]

    def _activate(self) -> None:
        b = self._order[self._position]
        for p in self._params[b]:
            p.requires_grad_(True)
        self._truncation.set_active(self._units[b])
        if self.config.prefetch:
            self._store.prefetch(b)

    def _advance(self) -> None:
        b = self._order[self._position]
        for p in self._params[b]:
            p.requires_grad_(False)
            p.grad = None
        self._position = (self._position + 1) % self.num_groups
        if self._position == 0:
            self.cycle += 1
        self.steps += 1
        self._activate()

    def _finish_group(self, b: int) -> None:
        for p in (*self._params[b], *self._masters[b]) if self._mixed else self._params[b]:
            p.grad = None
        self._grads_ready = False
        self._page_out(b)

    def _page_out(self, b: int) -> None:
        if b not in self._resident:
            return
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, Any] = {}
        inner = self._inner[b]
        for i, p in enumerate(self._step_params(b)):
            for key, value in inner.state.get(p, {}).items():
                target = tensors if torch.is_tensor(value) else scalars
                target[f"state.{i}.{key}"] = value
        if self._mixed:
            for i, m in enumerate(self._masters[b]):
                tensors[f"master.{i}"] = m.data
        self._clear_state(b)
        self._scalars[b] = scalars
        self._store.put(b, tensors)
        self._resident.discard(b)

    def _page_in(self, b: int) -> None:
        if b in self._resident:
            return
        self._fill_state(b, self._store.get(b))
        self._resident.add(b)

    def _fill_state(self, b: int, tensors: dict[str, torch.Tensor]) -> None:
        params = self._step_params(b)
        inner = self._inner[b]
        for name, value in {**tensors, **self._scalars[b]}.items():
            kind, rest = name.split(".", 1)
            if kind == "master":
                self._masters[b][int(rest)].data = value
            else:
                index, key = rest.split(".", 1)
                inner.state[params[int(index)]][key] = value

    def _clear_state(self, b: int) -> None:
        self._inner[b].state.clear()
        for m in self._masters[b] if self._mixed else ():
            # Keep the Parameter object (the optimizer's state is keyed by it), drop its data.
            m.data = torch.empty(0, dtype=m.dtype, device=m.device)


#: The :class:`_Claim` of each model a HiFTOptimizer drives. Kept beside the model, not on it,
#: so that pickling or deep-copying a model never meets the weak reference inside.
_CLAIMS: weakref.WeakKeyDictionary[nn.Module, _Claim] = weakref.WeakKeyDictionary()


class _Claim:
    """What a HiFTOptimizer changed on its model, so it can be undone without the optimizer.

    Holds the optimizer weakly: a model kept alive after its optimizer was dropped (e.g. a
    notebook cell re-run) must not keep the old optimizer's state alive too.
    """

    def __init__(self, owner: HiFTOptimizer, params: list[nn.Parameter]) -> None:
        self.owner = weakref.ref(owner)
        self.truncation = owner._truncation
        self.params = params
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.truncation.remove()
            for p in self.params:
                p.requires_grad_(True)
            self.released = True


def _release_stale_claim(model: nn.Module) -> None:
    """Refuses a model another live HiFTOptimizer drives; undoes a dropped, unclosed one."""
    claim = _CLAIMS.get(model)
    if claim is None or claim.released:
        return
    if claim.owner() is not None:
        gc.collect()  # a dropped optimizer caught in a reference cycle is freed only by the collector
    owner = claim.owner()
    if owner is not None:
        raise RuntimeError(
            f"this model is already driven by {owner!r}; call its close() first (that makes the "
            "parameters it froze trainable again) or start from a fresh model"
        )
    # Its optimizer is gone without close(): without this, all but one group would stay frozen
    # and its backward-truncation hooks would keep cutting the graph.
    warnings.warn(
        "the model's previous HiFTOptimizer was dropped without close(); undoing its freezing "
        "and hooks before wrapping the model again",
        stacklevel=3,
    )
    claim.release()
    del _CLAIMS[model]


def _all_reduce_mean(params: list[nn.Parameter]) -> None:
    """Averages the gradients of ``params`` over all ranks in one flat all-reduce.

    DDP cannot do this for HiFT: it registers its gradient hooks only for the parameters that
    require grad when the model is wrapped, and HiFT changes that set every step. A rank without
    a gradient for a parameter contributes zeros, so every rank joins the same collective.
    """
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat.div_(torch.distributed.get_world_size())
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g)
        offset += n


def _param_groups(
    named: list[tuple[str, nn.Parameter]],
    step_params: list[nn.Parameter],
    fn: ParamGroupsFn | None,
) -> list[dict[str, Any]]:
    """One HiFT group's torch param groups, over the tensors its optimizer steps on."""
    if fn is None:
        return [{"params": list(step_params)}]
    # In mixed precision the optimizer steps on fp32 masters: map each model parameter to its
    # master, so the user's function can think in model parameters.
    to_step = {id(p): s for (_, p), s in zip(named, step_params, strict=True)}
    groups = []
    placed = 0
    for group in fn(named):
        params = [to_step[id(p)] for p in group["params"]]
        placed += len(params)
        if params:
            groups.append({**group, "params": params})
    if placed != len(named):
        raise ValueError(
            f"param_groups_fn must place each of the {len(named)} parameters it is given exactly "
            f"once; it placed {placed}"
        )
    return groups


class DelayedLR:
    """Advances a learning-rate scheduler once per HiFT cycle instead of once per step.

    Every group is then updated with the same learning rate within a cycle. Call :meth:`step`
    after every optimizer step, exactly as with the wrapped scheduler; it steps the wrapped
    scheduler only when a cycle has completed since the last call.

    Args:
        scheduler: The scheduler to delay (built on ``optimizer``).
        optimizer: The :class:`HiFTOptimizer` whose cycles drive it.
    """

    def __init__(self, scheduler: Any, optimizer: HiFTOptimizer) -> None:
        self.scheduler = scheduler
        self.optimizer = optimizer
        self.cycles_seen = optimizer.cycle

    def step(self) -> None:
        """Steps the wrapped scheduler once for each cycle completed since the last call."""
        while self.cycles_seen < self.optimizer.cycle:
            self.scheduler.step()
            self.cycles_seen += 1

    def get_last_lr(self) -> list[float]:
        """The learning rates of the last scheduler step, one per param group."""
        return self.scheduler.get_last_lr()

    @property
    def last_epoch(self) -> int:
        """The wrapped scheduler's step count (in cycles)."""
        return self.scheduler.last_epoch

    def state_dict(self) -> dict[str, Any]:
        """The wrapped scheduler's state plus the cycle count it has seen."""
        return {"scheduler": self.scheduler.state_dict(), "cycles_seen": self.cycles_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output."""
        self.scheduler.load_state_dict(state_dict["scheduler"])
        self.cycles_seen = int(state_dict["cycles_seen"])


class _BackwardTruncation:
    """Keeps autograd from building a graph below the lowest active block.

    Freezing is enough on its own until something makes an activation require grad from below:
    Hugging Face's gradient checkpointing does exactly that (``enable_input_require_grads``) so
    that reentrant checkpoints see a grad-requiring input. These pre-hooks detach the inputs of
    every block up to the lowest active one, and, when that block is checkpointed, give it a fresh
    grad-requiring input so that reentrant checkpointing still computes its weight gradients.
    """

    def __init__(self, model: nn.Module, units: Iterable[Unit]) -> None:
        blocks = [u for u in units if u.module is not None]
        self._index = {u.name: i for i, u in enumerate(blocks)}
        self._lowest: int | None = None
        self._handles = []
        for i, u in enumerate(blocks):
            block = model.get_submodule(u.module)  # type: ignore[arg-type]
            self._handles.append(
                block.register_forward_pre_hook(partial(self._hook, i), with_kwargs=True)
            )
            self._handles.append(block.register_forward_hook(self._restore, always_call=True))
        self._paused: dict[int, bool] = {}

    def set_active(self, units: Iterable[Unit]) -> None:
        indices = []
        for u in units:
            if u.name == EMBED or (u.module is None and u.name != HEAD):
                self._lowest = None  # training the embedding (or an unknown unit): no cut
                return
            if u.name in self._index:
                indices.append(self._index[u.name])
        self._lowest = min(indices) if indices else len(self._index)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(
        self, index: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        lowest = self._lowest
        if lowest is None or index > lowest or not torch.is_grad_enabled():
            return None
        args = tuple(_detached(a) for a in args)
        kwargs = {k: _detached(v) for k, v in kwargs.items()}
        if index < lowest and getattr(module, "gradient_checkpointing", False):
            # A frozen block below the active ones builds no graph, so checkpointing it only
            # costs time (and a "no input requires grad" warning): pause it for this call.
            self._paused[id(module)] = module.gradient_checkpointing
            module.gradient_checkpointing = False
        if index == lowest and module.training and getattr(module, "gradient_checkpointing", False):
            if args and torch.is_tensor(args[0]) and args[0].is_floating_point():
                args = (args[0].detach().requires_grad_(True), *args[1:])
            elif torch.is_tensor(kwargs.get("hidden_states")):
                kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_(True)
        return args, kwargs

    def _restore(self, module: nn.Module, args: Any, output: Any) -> None:
        if id(module) in self._paused:
            module.gradient_checkpointing = self._paused.pop(id(module))


def _detached(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach() if value.requires_grad else value
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return value
