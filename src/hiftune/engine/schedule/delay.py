"""The delayed learning rate: a scheduler that advances once per HiFT cycle, not once per step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for the annotation: the optimizer module imports this one
    from ..optimizer import HiFTOptimizer


class DelayedLR:
    """Advances a learning-rate scheduler once per HiFT cycle instead of once per step.

    Every group is then updated with the same learning rate within a cycle. Call :meth:`step`
    after every optimizer step, exactly as with the wrapped scheduler; it steps the wrapped
    scheduler only when a cycle has completed since the last call. Build it with
    :meth:`HiFTOptimizer.delay`, which checks that the scheduler drives that optimizer.

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
