"""What the recipe adds around ``Trainer.train``: progress bars, a per-step log, interrupts.

:class:`Progress` is a ``TrainerCallback``: a tqdm bar (loss, active group, memory), a bar for
every evaluation (the zero-shot one before training too, which is minutes of work on the default
model), one record per optimizer step (group, peak memory, time, loss, learning rate), the run's config and a checksum
manifest in every checkpoint, and the stop that :class:`Interrupt` asks for. :class:`Interrupt`
turns the first Ctrl-C, SIGTERM or SIGHUP (how schedulers preempt a job, and a closed terminal)
into "checkpoint after this step and stop", the second into an immediate abort.
:class:`StopIfFinished` keeps a resumed run that has already reached its last step from training.

Under ``torchrun`` or ``accelerate launch`` the bar and the checkpoints' extra files are the main
process's, and a stop signal that reaches any process stops them all after the same step.
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

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_utils import has_length

from ..integrations.transformers import unwrap_hift
from ..memory.measure import PeakMemory, peak_memory_mib
from .checkpoints import write_manifest
from .config import RUN_CONFIG
from .plan import compress_names

logger = logging.getLogger(__name__)


#: The signals that stop a run with a checkpoint: Ctrl-C, a scheduler's preemption, a hang-up.
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupt:
    """While active, the first stop signal asks the Trainer to checkpoint and stop; a second aborts.

    The signals are :data:`SIGNALS`: Ctrl-C, SIGTERM (what a cluster scheduler sends to preempt a
    job before it kills it) and SIGHUP (the terminal went away). A context manager: it installs
    its handlers on entry (in the main thread only, where Python delivers signals) and puts the
    previous handlers back on exit.

    Attributes:
        requested: Whether a stop signal arrived while active.
        signum: The first stop signal that arrived (``None`` if none did).
    """

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        logger.warning(
            "interrupted (%s): saving a checkpoint after this step (Ctrl-C again to abort)",
            signal.Signals(signum).name,
        )


class RunFinished(Exception):
    """Raised by :class:`StopIfFinished`: the resumed checkpoint is already at the last step."""


class StopIfFinished(TrainerCallback):
    """Stops a resumed run whose checkpoint has reached ``max_steps`` before it trains a step.

    The Trainer checks for the end of training only after a step, so resuming a finished
    checkpoint would train one step more than asked (and every further resume another). When
    training begins, the model, optimizer and scheduler are restored and the target is known;
    this raises :class:`RunFinished` then, for the recipe to go straight to evaluating and saving.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise RunFinished(f"the checkpoint is at step {state.global_step} of {state.max_steps}")


class Progress(TrainerCallback):
    """Progress bars, per-step log, interrupts and the run config in every checkpoint.

    Evaluation gets a bar of its own (batches done of the evaluation set), as the Trainer's
    ``ProgressCallback`` draws it, which the recipe's arguments turn off (``disable_tqdm``) along
    with its training bar. During training it is drawn below the training bar and removed when done.

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
        self._eval_bar: Any = None
        self._meter: PeakMemory | None = None
        self._device: Any = "cpu"
        self._peak = 0.0
        self._group = ""
        self._t0 = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:  # one bar for the run, however many processes
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
        # The group active now is the one this step trains (the optimizer moves on in step()),
        # named as the plan printed before training names it.
        name = hift.group_names[hift.active_group] if hift is not None else "all"
        self._group = compress_names([name])

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
        if self.interrupt is None:
            return
        if args.world_size > 1 and dist.is_initialized():
            # The processes of a run stop after the same step (one that trained on would wait
            # forever for the others in its next collective), whichever of them got the signal.
            flag = torch.tensor([int(self.interrupt.requested)], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item():  # (never reset: a signal may have arrived during the all-reduce)
                self.interrupt.requested = True
        if self.interrupt.requested:
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

    def on_prediction_step(
        self, args: Any, state: Any, control: Any, eval_dataloader: Any = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not has_length(eval_dataloader):
            return
        if self._eval_bar is None:
            self._eval_bar = tqdm(
                total=len(eval_dataloader), desc="eval", unit="batch", leave=self._bar is None
            )
        self._eval_bar.update(1)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close_eval_bar()

    def on_predict(
        self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any
    ) -> None:
        self._close_eval_bar()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Every checkpoint carries the run's config, so resuming can check it belongs to this run,
        # and, written last, the checksums of its files, so resuming can tell it is whole.
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and ckpt.is_dir():  # the process that wrote it
            (ckpt / RUN_CONFIG).write_text(json.dumps(self.meta, indent=2) + "\n")
            write_manifest(ckpt)

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
        self._close_eval_bar()
        if self._meter is not None:
            self._meter.close()
        for s in self.steps:
            s.setdefault("loss", float("nan"))

    def _close_eval_bar(self) -> None:
        if self._eval_bar is not None:
            self._eval_bar.close()
            self._eval_bar = None
