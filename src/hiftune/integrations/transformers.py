"""HiFT inside Hugging Face ``transformers.Trainer`` and TRL trainers, through their extension points.

Nothing of the Trainer's loop is copied: :class:`HiFTTrainerMixin` overrides the documented hooks
``create_optimizer``, ``create_scheduler`` and ``compute_loss``, and the Trainer's gradient-norm
hooks ``_clip_grad_norm`` / ``_get_grad_norm``. The Trainer then drives HiFT like any optimizer: it
calls ``optimizer.step()`` once per *optimizer* step (so gradient accumulation trains one group
over all micro-batches), clips with ``max_grad_norm`` (through :meth:`HiFTOptimizer.clip_grad_norm_`,
on the active group's unscaled gradients), and saves and restores ``optimizer.state_dict()`` in
checkpoints (so ``resume_from_checkpoint`` restores the queue, the order, every group's state and
the delayed scheduler).

Under ``torchrun`` / ``accelerate launch`` the model is prepared without DDP (``_wrap_model``):
HiFTOptimizer averages the active group's gradients itself, once per optimizer step. The checkpoint
hooks (``_save``, ``_load_from_checkpoint``, ``_save_optimizer_and_scheduler``,
``_load_optimizer_and_scheduler``) make every rank join the state gathering of
``HiFTConfig(shard_state=True)``, and checkpoint a model sharded with FSDP2
(:mod:`.fsdp_checkpoints`). See ``docs/distributed.md``.

With ``precision="fp16"`` the loss the Trainer backpropagates is scaled by the optimizer's loss
scale in the backward pass only (:func:`scale_gradients`): the logged loss keeps its value, the
gradients are scaled, and :meth:`HiFTOptimizer.step` unscales them (skipping overflowing steps).

Example::

    from hiftune import HiFTConfig
    from hiftune.integrations.transformers import HiFTTrainer

    trainer = HiFTTrainer(model=model, args=args, train_dataset=ds, hift_config=HiFTConfig())
    trainer.train()
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import Trainer, TrainerCallback
from transformers import __version__ as transformers_version
from transformers.optimization import get_scheduler
from transformers.trainer import SCHEDULER_NAME

from ..engine.config import HiFTConfig
from ..engine.optimizer import HiFTOptimizer
from . import fsdp_checkpoints

__all__ = [
    "HiFTCallback",
    "HiFTSFTTrainer",  # noqa: F822 - built lazily by the module's __getattr__
    "HiFTTrainer",
    "HiFTTrainerMixin",
    "scale_gradients",
    "unwrap_hift",
]


class _ScaleGradients(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        return grads[0] * ctx.scale, None


def scale_gradients(loss: torch.Tensor, scale: float) -> torch.Tensor:
    """``loss`` unchanged in value, but its gradients are ``scale`` times larger.

    This is fp16 loss scaling that leaves the loss the Trainer logs and averages untouched
    (``loss * scale`` would log a loss 65536 times too large).
    """
    if scale == 1.0:
        return loss
    out: torch.Tensor = _ScaleGradients.apply(loss, scale)
    return out


def unwrap_hift(optimizer: Any) -> HiFTOptimizer | None:
    """The :class:`HiFTOptimizer` inside ``optimizer`` (e.g. an accelerate wrapper), if any."""
    while optimizer is not None and not isinstance(optimizer, HiFTOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


#: The Trainer's gradient-norm hooks that fp16 loss scaling depends on.
_NORM_HOOKS = ("_clip_grad_norm", "_get_grad_norm")

if TYPE_CHECKING:
    # For the type checker the mixin is a Trainer (it is only ever mixed into one); at run time
    # it must stay a plain class so that it can go first in any Trainer subclass's bases.
    _TrainerBase = Trainer
else:
    _TrainerBase = object


class HiFTTrainerMixin(_TrainerBase):
    """Makes a ``transformers.Trainer`` subclass train with HiFT.

    Mix it in *before* the trainer class: ``class MyTrainer(HiFTTrainerMixin, SFTTrainer)``.
    The optimizer is the one the Trainer would build (``args.optim``, ``args.optim_args``, or the
    ``optimizer_cls_and_kwargs`` argument), with the Trainer's weight-decay split, wrapped in a
    :class:`HiFTOptimizer`. The scheduler is ``args.lr_scheduler_type``, with its length and warm-up
    converted from steps to cycles and delayed, so it advances once per cycle.

    Args:
        hift_config: The HiFT configuration (keyword-only; default ``HiFTConfig()``).
        *args, **kwargs: Passed to the Trainer.
    """

    def __init__(self, *args: Any, hift_config: HiFTConfig | None = None, **kwargs: Any) -> None:
        self.hift_config = hift_config if hift_config is not None else HiFTConfig()
        if self.hift_config.precision == "fp16" and not all(
            callable(getattr(Trainer, hook, None)) for hook in _NORM_HOOKS
        ):
            # Without these hooks the Trainer would clip the scaled fp16 gradients itself, and
            # step() would then divide already clipped gradients by the loss scale.
            raise ValueError(
                f"precision='fp16' needs the Trainer hooks {', '.join(_NORM_HOOKS)}, which this "
                f"transformers {transformers_version} lacks; use precision='bf16'"
            )
        super().__init__(*args, **kwargs)
        if self.args.fp16:
            # accelerate's GradScaler would scale the loss but find no gradients to unscale (the
            # clipping hook hands them to HiFT), so every update shrank by the loss scale; with a
            # half-precision HiFT its step fails an assert.
            raise ValueError(
                "HiFTTrainer does not run under TrainingArguments(fp16=True); for fp16 use "
                "hift_config=HiFTConfig(precision='fp16') (loss scaling in the optimizer), or bf16=True"
            )
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            # Both re-shard the model (and rebuild the optimizer's parameters) after HiFT has
            # built its groups over the original parameters, and assume every one is trainable.
            raise ValueError(
                "HiFTTrainer does not run under the Trainer's fsdp or deepspeed options; for "
                "FSDP2, shard the model with hiftune.engine.fsdp.shard_by_units before the "
                "Trainer (see docs/distributed.md)"
            )
        # First in line, so the printer and loggers that run after it see the HiFT fields.
        self.callback_handler.callbacks.insert(0, HiFTCallback())

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The Trainer's loss; with fp16, its gradients scaled by the loss scale (extension point).

        Only in training (gradients enabled): evaluation losses are never scaled.
        """
        out = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        hift = unwrap_hift(self.optimizer)
        if hift is None or not torch.is_grad_enabled() or hift.loss_scale == 1.0:
            return out
        if isinstance(out, tuple):  # return_outputs=True: (loss, outputs)
            return scale_gradients(out[0], hift.loss_scale), out[1]
        return scale_gradients(out, hift.loss_scale)

    def _wrap_model(self, model: Any, training: bool = True, dataloader: Any = None) -> Any:
        # Under torchrun / accelerate launch, accelerate would wrap the model in DDP here, whose
        # buckets cover every parameter that requires grad at wrap time (only the active group:
        # later groups would never be synchronised) and whose reducer fights HiFT's changing set
        # of trainable parameters. HiFTOptimizer averages the active group's gradients itself,
        # once per optimizer step; so the model is prepared like the Trainer prepares models that
        # own their gradient reduction (evaluation_mode: device placement, autocast and
        # compilation, no DDP), and accelerate's later prepare() leaves it as it is.
        model = super()._wrap_model(model, training, dataloader)
        hift = unwrap_hift(self.optimizer)
        if (
            training
            and hift is not None
            and model is self.model
            and self.accelerator.use_distributed
            and self.accelerator.unwrap_model(model, keep_torch_compile=False) is model
        ):
            model = self.accelerator.prepare_model(model, evaluation_mode=True)
        return model

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Every rank comes here from save_model. A model sharded with FSDP2 holds DTensor shards,
        # which safetensors cannot write: gather the whole weights first (a collective).
        if state_dict is None and fsdp_checkpoints.is_fsdp2_model(self.model):
            state_dict = fsdp_checkpoints.full_weights(self.model)  # type: ignore[arg-type]
        super()._save(output_dir, state_dict=state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        model = self.model if model is None else model
        if fsdp_checkpoints.is_fsdp2_model(model):
            fsdp_checkpoints.load_full_weights(model, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        hift = unwrap_hift(self.optimizer)
        if hift is not None and fsdp_checkpoints.is_fsdp2_model(self.model):
            # FSDP2: each rank's state holds its own shards: one file per rank, and the scheduler.
            args = self.args
            path = fsdp_checkpoints.optimizer_shard_path(
                output_dir, args.process_index, args.world_size
            )
            path.parent.mkdir(parents=True, exist_ok=True)  # rank 0 may not have made it yet
            torch.save(hift.state_dict(), path)
            if args.should_save and self.lr_scheduler is not None:
                torch.save(self.lr_scheduler.state_dict(), f"{output_dir}/{SCHEDULER_NAME}")
            return
        # With shard_state=True each rank keeps only its share of the groups, so the optimizer's
        # state_dict() is a collective in which every owner sends its groups to the saving rank.
        # The Trainer calls it on the saving process only; the others join here, so the
        # checkpoint is whole (and resumes on any number of processes).
        if hift is not None and hift.sharding is not None and not self.args.should_save:
            hift.state_dict()
        super()._save_optimizer_and_scheduler(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        hift = unwrap_hift(self.optimizer)
        if checkpoint is None or hift is None or not fsdp_checkpoints.is_fsdp2_model(self.model):
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        fsdp_checkpoints.load_optimizer_shard(
            hift, checkpoint, self.args.process_index, self.args.world_size
        )
        if self.lr_scheduler is not None:
            scheduler = torch.load(f"{checkpoint}/{SCHEDULER_NAME}", weights_only=True)
            self.lr_scheduler.load_state_dict(scheduler)

    def _clip_grad_norm(self, model: Any) -> Any:
        # The Trainer would clip model.parameters(): in fp16 those hold the *scaled* gradients,
        # so clipping them to max_grad_norm would shrink every update by the loss scale.
        hift = unwrap_hift(self.optimizer)
        if hift is None:
            return super()._clip_grad_norm(model)
        return hift.clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        # The norm logged without clipping: of the unscaled gradients, as with clipping.
        hift = unwrap_hift(self.optimizer)
        if grad_norm is None and hift is not None:
            grad_norm = hift.clip_grad_norm_(float("inf"))
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """Builds the :class:`HiFTOptimizer` (Trainer extension point)."""
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        if model is None:
            raise RuntimeError("HiFTTrainer needs a model to build its optimizer")
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            # Any nn.Module, as the Trainer's own create_optimizer passes it.
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(
                self.args,
                model,  # type: ignore[arg-type]
            )
        optimizer_kwargs = dict(optimizer_kwargs)
        unsupported = {"params", "model", "optimizer_dict"} & optimizer_kwargs.keys()
        if unsupported:
            raise ValueError(
                f"optim={self.args.optim!r} builds its own parameter layout ({sorted(unsupported)}) "
                "and cannot be wrapped by HiFT; choose a plain optimizer (adamw_torch, sgd, ...)"
            )
        decay = set(self.get_decay_parameter_names(model))
        weight_decay = self.args.weight_decay

        def split_decay(named: list[tuple[str, torch.nn.Parameter]]) -> list[dict[str, Any]]:
            return [
                {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
                {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
            ]

        self.optimizer = HiFTOptimizer(
            model, optimizer_cls, self.hift_config, param_groups_fn=split_decay, **optimizer_kwargs
        )
        return self.optimizer

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> Any:
        """Builds ``args.lr_scheduler_type`` counted in cycles, delayed (Trainer extension point)."""
        if self.lr_scheduler is None:
            hift = unwrap_hift(optimizer if optimizer is not None else self.optimizer)
            if hift is None:
                raise RuntimeError("HiFTTrainer needs its HiFTOptimizer; create_optimizer first")
            k = hift.steps_per_cycle  # k groups x K steps each (HiFTConfig.steps_per_group)
            cycles = max(1, math.ceil(num_training_steps / k))
            warmup = math.ceil(self.args.get_warmup_steps(num_training_steps) / k)
            scheduler = get_scheduler(
                self.args.lr_scheduler_type,
                optimizer=hift,
                num_warmup_steps=warmup,
                num_training_steps=cycles,
                # TrainingArguments parses a JSON string into a dict on construction.
                scheduler_specific_kwargs=cast(
                    "dict[str, Any] | None", self.args.lr_scheduler_kwargs
                ),
            )
            # Not an LRScheduler, but it has all the Trainer calls: step, get_last_lr and the
            # state_dict pair.
            self.lr_scheduler = hift.delay(scheduler)  # type: ignore[assignment]
        return self.lr_scheduler


class HiFTTrainer(HiFTTrainerMixin, Trainer):
    """``transformers.Trainer`` that trains with HiFT; takes ``hift_config=`` on top of Trainer's."""


class HiFTCallback(TrainerCallback):
    """Adds HiFT's progress to the Trainer's logs (console, TensorBoard, W&B, ...).

    Keys: ``hift_group``, the index of the group the latest optimizer step trained (with
    ``logging_steps > 1`` the logged loss averages steps of several groups), and ``hift_cycle``,
    the number of completed cycles. :class:`HiFTTrainerMixin` adds it by itself; with a stock
    ``Trainer`` and ``optimizers=(hift_optimizer, scheduler)``, pass it in ``callbacks=``.
    The Trainer appends ``state.log_history`` before callbacks run, so the keys are not in it.
    """

    def __init__(self) -> None:
        self._trained: int | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Read before the step: HiFTOptimizer.step() moves on to the next group.
        hift = unwrap_hift(kwargs.get("optimizer"))
        if hift is not None:
            self._trained = hift.active_group

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any):
        hift = unwrap_hift(kwargs.get("optimizer"))
        if hift is not None and logs is not None:
            logs["hift_cycle"] = hift.cycle
            if self._trained is not None:
                logs["hift_group"] = self._trained


def __getattr__(name: str) -> Any:
    # TRL is optional and slow to import: build the TRL trainer class on first use only.
    if name == "HiFTSFTTrainer":
        from trl import SFTTrainer

        cls = type(
            "HiFTSFTTrainer",
            (HiFTTrainerMixin, SFTTrainer),
            {"__doc__": "TRL ``SFTTrainer`` that trains with HiFT; takes ``hift_config=``."},
        )
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
