"""NonFiniteGuard: a loss that is not finite, explodes or no longer moves stops the run; a sound
run, however short or bumpy, never does."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from hiftune import HiFTOptimizer
from hiftune.recipes.guards import NonFiniteGuard


class Control:
    should_training_stop = should_save = False


class Hift(HiFTOptimizer):
    """Only what the guard reads of the optimizer: its cycle and its fp16 skipped steps."""

    steps_per_cycle = 1
    skipped_steps = 0

    def __init__(self) -> None:
        pass


def feed(logs: list[dict], steps_per_cycle: int = 1, skipped: list[int] | None = None):
    """Logs each step's ``logs`` into a fresh guard; returns it and the step it stopped at."""
    guard, control = NonFiniteGuard(), Control()
    hift = Hift()
    hift.steps_per_cycle = steps_per_cycle
    args = SimpleNamespace(learning_rate=1e6)
    for step, entry in enumerate(logs, start=1):
        hift.skipped_steps = (skipped or [0] * len(logs))[step - 1]
        state = SimpleNamespace(global_step=step)
        guard.on_log(args, state, control, logs={"learning_rate": 1e-5, **entry}, optimizer=hift)
        if control.should_training_stop:
            assert not control.should_save
            return guard, step
    return guard, None


def test_a_dead_model_stops_after_a_whole_cycle_without_gradients():
    # lr 1e6 in fp32 or bf16: the model saturates, the loss stays put, no gradient anywhere.
    logs = [{"loss": 0.93, "grad_norm": 3.0}] + [{"loss": 0.9242, "grad_norm": 0.0}] * 10
    guard, step = feed(logs, steps_per_cycle=4)
    assert step == 5  # steps 2-5: every one of the 4 groups had no gradient
    assert guard.failure.startswith("training diverged: the gradient norm has been exactly 0")
    assert "since step 2 (4 steps)" in guard.failure and "--lr 1e+06" in guard.failure
    assert feed(logs, steps_per_cycle=1)[1] == 4  # at least PATIENCE steps


def test_a_dead_model_without_gradient_norms_stops_when_the_loss_no_longer_moves():
    logs = [{"loss": 0.93}] + [{"loss": 0.9242}] * 6  # --max-grad-norm 0 logs no norm
    guard, step = feed(logs, steps_per_cycle=2)
    assert step == 5 and "loss has not moved since step 3" in guard.failure


def test_an_exploding_loss_stops_the_run():
    logs = [{"loss": 0.93, "grad_norm": 3.0}, {"loss": 1.6, "grad_norm": 400.0}]
    logs += [{"loss": 2127.0, "grad_norm": 1e7}, {"loss": 0.0, "grad_norm": 0.0}]
    logs += [{"loss": 1560.0 + i, "grad_norm": 1e7} for i in range(6)]
    guard, step = feed(logs, steps_per_cycle=4)
    assert step == 8 and "loss exploded from 0.93 to 1563" in guard.failure


def test_a_non_finite_loss_stops_at_once():
    guard, step = feed([{"loss": 0.9, "grad_norm": 1.0}, {"loss": math.nan, "grad_norm": 1.0}])
    assert step == 2 and "training loss is nan at step 2" in guard.failure


@pytest.mark.parametrize(
    "logs",
    [
        # a sound short run: small moves, a spike of one bad batch, one group with no gradient
        [{"loss": 2.0 - 0.01 * i, "grad_norm": 0.0 if i % 4 == 2 else 1.0} for i in range(40)],
        [{"loss": 0.5, "grad_norm": 1.0}, {"loss": 500.0, "grad_norm": 90.0}]
        + [{"loss": 0.5, "grad_norm": 1.0}] * 8,
        # a memorised training set: a loss of exactly 0 has no gradient, rightly
        [{"loss": 0.0, "grad_norm": 0.0}] * 12,
        # warm-up from a learning rate of 0 on repeated batches: the same loss, rightly
        [{"loss": 1.25, "learning_rate": 0.0}] * 6,
    ],
    ids=["bumpy", "spike", "memorised", "warm-up"],
)
def test_sound_runs_are_never_stopped(logs):
    assert feed(logs, steps_per_cycle=4)[1] is None and feed(logs, steps_per_cycle=1)[1] is None


def test_fp16_steps_skipped_on_overflow_do_not_count():
    logs = [{"loss": 0.9, "grad_norm": 1.0}] + [{"loss": 0.9, "grad_norm": 0.0}] * 2
    logs += [{"loss": 0.9, "grad_norm": math.inf}] * 4 + [{"loss": 0.9, "grad_norm": 0.0}]
    skipped = [0, 0, 0, 1, 2, 3, 4, 4]
    guard, step = feed(logs, steps_per_cycle=1, skipped=skipped)
    assert step == 8 and "since step 2 (3 steps)" in guard.failure
