"""What the recipe adds around ``Trainer.train``: a progress bar, a per-step log, interrupts.

:class:`Progress` is a ``TrainerCallback``: a tqdm bar (loss, active group, memory), one record per
optimizer step (group, peak memory, time, loss, learning rate), the run's config in every
checkpoint, and the stop that :class:`Interrupt` asks for. :class:`Interrupt` turns the first
Ctrl-C into "checkpoint after this step and stop", the second into an immediate abort.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback

from ..integrations.transformers import unwrap_hift
from ..memory.measure import PeakMemory, peak_memory_mib
from .config import RUN_CONFIG

logger = logging.getLogger(__name__)


class Interrupt:
    """While active, the first Ctrl-C asks the Trainer to checkpoint and stop; the second aborts.

    A context manager: it installs its SIGINT handler on entry (in the main thread only, where
    Python delivers signals) and puts the previous handler back on exit.

    Attributes:
        requested: Whether a Ctrl-C arrived while active.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("interrupted: saving a checkpoint after this step (Ctrl-C again to abort)")


class Progress(TrainerCallback):
    """Progress bar, per-step log, interrupts and the run config in every checkpoint.

    Args:
        meta: The run file's content (config and identity), written into every checkpoint so
            that resuming can check the checkpoint belongs to the run.
        interrupt: Its request stops training after the current step, with a checkpoint.

    Attributes:
        steps: One record per optimizer step: ``step``, ``group`` (trained), ``memory_mib``
            (peak during the step), ``seconds`` (since training began), ``loss``, ``lr``.
    """

    def __init__(self, meta: Mapping[str, Any], interrupt: Interrupt | None = None) -> None:
        self.meta = meta
        self.interrupt = interrupt
        self.steps: list[dict[str, Any]] = []
        self._bar: Any = None
        self._meter: PeakMemory | None = None
        self._device: Any = "cpu"
        self._peak = 0.0
        self._group = ""
        self._t0 = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._bar = tqdm(
            total=state.max_steps, initial=state.global_step, desc="train", unit="step"
        )
        self._device = args.device
        # The meter resets the process's high-water mark at every step, so what came before
        # (loading, the zero-shot evaluation) is read now, for peak_mib().
        self._peak = peak_memory_mib(self._device)
        self._meter = PeakMemory(self._device)
        self._meter.reset()
        self._t0 = time.perf_counter()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        hift = unwrap_hift(kwargs.get("optimizer"))
        # The group active now is the one this step trains (the optimizer moves on in step()).
        self._group = hift.group_names[hift.active_group] if hift is not None else "all"

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        mem = self._meter.take_peak() if self._meter else float("nan")
        self._peak = max(self._peak, mem)
        self.steps.append(
            {
                "step": state.global_step,
                "group": self._group,
                "memory_mib": round(mem, 1),
                "seconds": round(time.perf_counter() - self._t0, 2),
            }
        )
        if self._bar is not None:
            self._bar.update(state.global_step - self._bar.n)
        if self.interrupt is not None and self.interrupt.requested:
            control.should_save = True
            control.should_training_stop = True

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
    ) -> None:
        if not logs or "loss" not in logs or not self.steps:
            return
        last = self.steps[-1]
        if last["step"] == state.global_step:
            last["loss"] = float(logs["loss"])
            last["lr"] = float(logs.get("learning_rate", float("nan")))
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{logs['loss']:.4f}", group=self._group, mem=f"{last['memory_mib']:.0f}MiB"
            )

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Every checkpoint carries the run's config, so resuming can check it belongs to this run.
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            (ckpt / RUN_CONFIG).write_text(json.dumps(self.meta, indent=2) + "\n")

    def peak_mib(self) -> float:
        """The process's peak memory so far (MiB), before, during and since training.

        The per-step meter resets the high-water mark that ``peak_memory_mib`` reads, so the
        run's peak is the largest of what was read before training, every step's peak and the
        peak since the last step.
        """
        since = self._meter.peak() if self._meter is not None else 0.0
        return max(self._peak, since, peak_memory_mib(self._device))

    def close(self) -> None:
        """Closes the bar and the memory meter; steps without a logged loss get ``nan``."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._meter is not None:
            self._meter.close()
        for s in self.steps:
            s.setdefault("loss", float("nan"))
