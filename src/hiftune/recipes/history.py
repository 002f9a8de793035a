"""A run's history across resumes: its steps, training time, peak memory and loss before a checkpoint.

A resumed run trains in a new process, whose progress records (:class:`.callbacks.Progress`) and
clocks start at the checkpoint's step, and whose ``Trainer`` averages the training loss over the
steps it trained itself. :class:`History` carries the rest: at every checkpoint it puts the run's
history so far into the run file the checkpoint holds (key :data:`HISTORY`), and a run resumed
from that checkpoint starts from it, so the report of an interrupted and resumed run covers the
whole run, like the report of the same run uninterrupted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

from transformers import TrainerCallback

from .callbacks import Progress

#: The key of the run file (``hiftune_run.json``) a checkpoint's history is saved under.
HISTORY = "history"


class History(TrainerCallback):
    """The whole run's per-step records, times, peak memory and training loss.

    Add it to the Trainer *before* ``progress``: its ``on_save`` must update ``meta`` before
    ``progress`` writes ``meta`` into the checkpoint.

    Args:
        meta: The run file's content, which ``progress`` writes into every checkpoint; each
            checkpoint's history goes into it under :data:`HISTORY`.
        progress: The callback that records this process's steps.
        saved: The run file of the checkpoint this run resumes (``None`` for a new run).
        started: When this process's run began (``time.perf_counter()``).
    """

    def __init__(
        self,
        meta: MutableMapping[str, Any],
        progress: Progress,
        saved: Mapping[str, Any] | None,
        started: float,
    ) -> None:
        earlier = (saved or {}).get(HISTORY) or {}
        self.meta = meta
        self.progress = progress
        self._steps: list[dict[str, Any]] = [dict(s) for s in earlier.get("per_step", [])]
        self._train_seconds = float(earlier.get("train_seconds", 0.0))
        self._total_seconds = float(earlier.get("total_seconds", 0.0))
        self._peak_mib = float(earlier.get("peak_memory_mib", 0.0))
        self._started = started
        self._training: float | None = None  # when this process's training began

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Only the steps up to the checkpoint: a later step is trained again.
        self._steps = [s for s in self._steps if s["step"] <= state.global_step]
        self._training = time.perf_counter()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.meta[HISTORY] = {
            "per_step": self.steps(),
            "train_seconds": self.train_seconds(),
            "total_seconds": self.total_seconds(),
            "peak_memory_mib": self.peak_memory_mib(),
        }

    def steps(self) -> list[dict[str, Any]]:
        """One record per optimizer step of the whole run; ``seconds`` count from its start."""
        shift = self._train_seconds  # this process's records count from its own training start
        now = [{**s, "seconds": round(s["seconds"] + shift, 2)} for s in self.progress.steps]
        return [*self._steps, *now]

    def train_seconds(self, this_process: float | None = None) -> float:
        """Time spent training, in this process and before the checkpoint it resumed.

        Args:
            this_process: The seconds this process trained (default: since its training began).
        """
        if this_process is None:
            this_process = 0.0 if self._training is None else time.perf_counter() - self._training
        return self._train_seconds + this_process

    def total_seconds(self) -> float:
        """Time of the whole run so far, in this process and before the checkpoint it resumed."""
        return self._total_seconds + time.perf_counter() - self._started

    def peak_memory_mib(self) -> float:
        """The run's peak memory: the highest of this process's and those before the resume."""
        return max(self._peak_mib, self.progress.peak_mib())

    def train_loss(self, trained: float) -> float:
        """The mean training loss over the whole run's steps.

        Args:
            trained: The Trainer's ``training_loss``: the mean over the steps this process
                trained (``nan`` if it trained none). hiftune logs every step, so the steps
                before the checkpoint carry their own losses.
        """
        before = [float(s.get("loss", math.nan)) for s in self._steps]
        n = len(self.progress.steps)
        if not before:
            return trained
        if n == 0:
            return math.fsum(before) / len(before)
        return (math.fsum(before) + trained * n) / (len(before) + n)
