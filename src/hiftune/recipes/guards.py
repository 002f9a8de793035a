"""Stopping a run whose loss or gradient norm stops being a finite number.

A learning rate far too high (``--lr 1e6``) turns the weights into ``nan`` within a step or two;
the Trainer would train on, hide the ``nan`` losses from its logs and save a model of ``nan``
weights as the result. :class:`NonFiniteGuard` watches every logged training step and stops the
run at the first non-finite loss or gradient norm, before that step is checkpointed; the recipe
then raises :class:`DivergedError` instead of evaluating or saving anything.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback

from ..errors import UserError
from ..integrations.transformers import unwrap_hift


class DivergedError(UserError):
    """Training produced a non-finite loss or gradient norm (a user error: the settings)."""


class NonFiniteGuard(TrainerCallback):
    """Stops training, without saving, at the first step with a non-finite loss or gradient norm.

    Needs ``logging_steps=1`` (every step logged) and ``logging_nan_inf_filter=False`` (else the
    Trainer replaces a ``nan`` loss by the average of the earlier ones).

    In HiFT's fp16 mode an overflowing gradient is expected now and then: the optimizer skips that
    step and lowers the loss scale, so the gradient norm of a skipped step is not a failure.

    Attributes:
        failure: What went wrong (``None`` while training is sound).
    """

    def __init__(self) -> None:
        self.failure: str | None = None
        self._skipped = 0

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
    ) -> None:
        if not logs or self.failure is not None or "loss" not in logs:
            return  # evaluation logs have eval_loss, not loss
        hift = unwrap_hift(kwargs.get("optimizer"))
        skipped = hift.skipped_steps if hift is not None else 0
        overflow_skipped, self._skipped = skipped > self._skipped, skipped
        for key, what in (("loss", "training loss"), ("grad_norm", "gradient norm")):
            value = logs.get(key)
            if value is None or (key == "grad_norm" and overflow_skipped):
                continue
            value = float(value)
            if not math.isfinite(value):
                lr = logs.get("learning_rate", args.learning_rate)
                self.failure = (
                    f"training diverged: the {what} is {value} at step {state.global_step}; "
                    f"the learning rate ({lr:g}) is likely too high (try a lower --lr), or the "
                    "data holds extreme values; the diverged model was not saved"
                )
                control.should_training_stop = True
                control.should_save = False  # never checkpoint non-finite weights
                return

    def check(self) -> None:
        """Raises :class:`DivergedError` if training diverged."""
        if self.failure is not None:
            raise DivergedError(self.failure)
