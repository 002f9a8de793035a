"""Stopping a run whose training diverged: a non-finite, exploding or dead loss.

A learning rate far too high (``--lr 1e6``) ruins a model within a step or two, in one of three
ways: the weights turn ``nan``; the loss explodes and stays far above where it began; or the
model collapses, its outputs saturated so that no gradient reaches any weight (the same loss at
every step, a gradient norm of exactly 0). The Trainer would train on, hide ``nan`` losses from
its logs, and save the ruined model as the result with exit code 0. :class:`NonFiniteGuard` reads
every logged training step and stops the run when it sees one of them, before that step is
checkpointed; the recipe then raises :class:`DivergedError` instead of evaluating or saving.

The checks read only what the Trainer logs anyway (loss, gradient norm, learning rate). An
exploding or dead loss must last a whole HiFT cycle (and at least :data:`PATIENCE` steps): in a
cycle every group is trained once, so one group that has no gradient, or one bad batch, never
stops a sound run.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback

from ..engine.guards import DivergedError
from ..integrations.transformers import unwrap_hift

__all__ = ["EXPLODED", "PATIENCE", "DivergedError", "NonFiniteGuard"]

#: The fewest consecutive steps an exploding or dead loss must last to stop the run.
PATIENCE = 3
#: An exploding loss: this many times the run's first loss (or 1, if that was smaller). A sound
#: run never gets there: a model guessing uniformly among 50,000 tokens scores 10.8.
EXPLODED = 100.0


class NonFiniteGuard(TrainerCallback):
    """Stops training, without saving, when it diverged (see the module's docstring).

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
        self._first: float | None = None  # the run's first logged loss
        self._previous: float | None = None
        self._dead = 0  # consecutive steps without any gradient
        self._dead_since = 0
        self._exploded = 0  # consecutive steps with an exploded loss

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
                self._stop(
                    control,
                    f"training diverged: the {what} is {value} at step {state.global_step}; "
                    f"the learning rate ({lr:g}) is likely too high (try a lower --lr), or the "
                    "data holds extreme values; the diverged model was not saved",
                )
                return
        cycle = hift.steps_per_cycle if hift is not None else 1
        self._watch(args, state, control, logs, max(PATIENCE, cycle), overflow_skipped)

    def _watch(
        self,
        args: Any,
        state: Any,
        control: Any,
        logs: dict[str, Any],
        window: int,
        overflow_skipped: bool,
    ) -> None:
        """Counts the steps of an exploded or dead loss; stops the run after ``window`` of either."""
        loss, grad = float(logs["loss"]), logs.get("grad_norm")
        first = self._first = loss if self._first is None else self._first
        previous, self._previous = self._previous, loss
        # Dead: no gradient at all (a loss of 0 has none either, rightly). Without gradient norms
        # (--max-grad-norm 0), the same loss to the last bit while the learning rate is not 0.
        if grad is not None:
            dead = float(grad) == 0.0
        else:
            dead = loss == previous and float(logs.get("learning_rate", 1.0)) != 0.0
        if not overflow_skipped:  # an fp16 step skipped on overflow tells nothing
            self._dead = self._dead + 1 if dead and loss > 0.0 else 0
            self._dead_since = state.global_step if self._dead == 1 else self._dead_since
        self._exploded = self._exploded + 1 if loss > EXPLODED * max(first, 1.0) else 0
        cause = (
            f"the learning rate (--lr {args.learning_rate:g}) is likely too high (try a lower "
            "--lr); the model was not saved"
        )
        if self._dead >= window:
            what = "gradient norm has been exactly 0" if grad is not None else "loss has not moved"
            self._stop(
                control,
                f"training diverged: the {what} since step {self._dead_since} "
                f"({self._dead} steps) with the loss at {loss:.4g}: the model no longer learns; "
                + cause,
            )
        elif self._exploded >= window:
            self._stop(
                control,
                f"training diverged: the training loss exploded from {first:.4g} to {loss:.4g} "
                f"(above {EXPLODED:g}x its start for {self._exploded} steps); " + cause,
            )

    def _stop(self, control: Any, failure: str) -> None:
        self.failure = failure
        control.should_training_stop = True
        control.should_save = False  # never checkpoint the diverged weights

    def check(self) -> None:
        """Raises :class:`DivergedError` if training diverged."""
        if self.failure is not None:
            raise DivergedError(self.failure)
