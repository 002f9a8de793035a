"""One run per output directory: an exclusive lock held for the whole run, and no silent mixing.

Two runs writing into one directory interleave their checkpoints, run file and model, and a later
``--resume`` continues one run's weights under the other's name. :class:`OutputDir` takes an
exclusive ``fcntl.flock`` on a lock file in the directory (released by the kernel when the process
ends, however it ends, so a crashed run never leaves a stale lock) and refuses a directory that
holds another run, unless the run resumes a checkpoint of that directory or was asked to
overwrite it.

Under ``torchrun`` or ``accelerate launch`` one run is several processes: only the main one holds
and writes the directory (:func:`is_main_process`), and :func:`on_main` shares the outcome of its
checks, so that a refused directory stops every process with the same one-line error.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, TypeVar

from ..errors import UserError
from .config import RUN_CONFIG

logger = logging.getLogger(__name__)

LOCK = ".hiftune.lock"
#: What a finished or interrupted run leaves, besides the model: removed by ``overwrite`` (the
#: model files are replaced by the new run's own).
RUN_FILES = (RUN_CONFIG, "report.json", "report.md", "loss.png", "memory.png")

T = TypeVar("T")


def launched_processes() -> int:
    """How many processes a launcher (``torchrun``, ``accelerate launch``) started: 1 without."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _process_group() -> bool:
    """Whether ``torch.distributed`` has a process group of several processes."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """Whether this process writes the run's files.

    Rank 0 of ``torch.distributed`` once its process group exists, else the launcher's ``RANK``
    0; a process started on its own is the main one.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def owned_process_group() -> Iterator[None]:
    """Destroys, on the way out, a process group created inside the block (by the Trainer's
    arguments, under ``torchrun``), never one that existed before (the caller's own).

    Left to interpreter exit, gloo's threads can abort a process that finished its work
    ("terminate called without an active exception"). After a normal exit the processes wait for
    each other first, so that none tears the group down while another still uses it.
    """
    import torch.distributed as dist

    existed = dist.is_available() and dist.is_initialized()
    ok = False
    try:
        yield
        ok = True
    finally:
        if not existed and dist.is_available() and dist.is_initialized():
            if ok:
                dist.barrier()
            dist.destroy_process_group()


def on_main(action: Callable[[], T]) -> T | None:
    """Runs ``action`` on the main process only; a :class:`UserError` it raises stops them all.

    With a process group of several processes this is a collective (every process must call
    it): the main process broadcasts whether ``action`` failed, and the others raise the same
    one-line error instead of waiting for a process that has stopped. They return ``None``.

    Raises:
        UserError: What ``action`` raised on the main process, on every process.
    """
    result: T | None = None
    error: UserError | None = None
    if is_main_process():
        try:
            result = action()
        except UserError as e:
            error = e
    if _process_group():
        import torch.distributed as dist

        message = [str(error) if error is not None else None]
        dist.broadcast_object_list(message, src=0)
        if error is None and message[0] is not None:
            error = UserError(message[0])
    if error is not None:
        raise error
    return result


class OutputDir:
    """Holds an output directory for one run (a context manager).

    On entry it creates the directory, locks it and checks what it holds; on exit it removes the
    lock file and unlocks it (and removes the directory again if the run failed before writing
    anything into it). A killed process leaves its lock file behind, unlocked: the next run
    takes it over.

    Args:
        path: The output directory.
        resuming: The checkpoint the run resumes, if any; resuming a checkpoint of ``path``
            continues the run that is there.
        overwrite: Start afresh in a directory that holds another run: its checkpoints, run file
            and report are removed.

    Raises:
        UserError: (On entry.) If another process holds the directory, it holds another run and
            neither ``resuming`` nor ``overwrite`` says to use it, or it cannot be written.
    """

    def __init__(self, path: Path, resuming: Path | None = None, overwrite: bool = False) -> None:
        self.path = path
        self.resuming = resuming
        self.overwrite = overwrite
        self._file: IO[str] | None = None
        self._created = False

    def __enter__(self) -> OutputDir:
        self._created = not self.path.exists()
        try:
            self._lock()
        except OSError as e:
            raise UserError(f"cannot write to --output-dir {self.path}: {e.strerror or e}") from e
        try:
            self._check_contents()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._file is None:
            return
        # Removed while still locked: a run that opened it meanwhile fails to lock it, or locks
        # it only after the removal, sees that it is gone and locks a new one (see _lock).
        (self.path / LOCK).unlink(missing_ok=True)
        if self._created and not any(self.path.iterdir()):
            with contextlib.suppress(OSError):  # another run has just put its lock file in
                self.path.rmdir()
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None

    def _lock(self) -> None:
        lock = self.path / LOCK
        while True:
            self.path.mkdir(parents=True, exist_ok=True)
            f = lock.open("a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                f.close()
                raise UserError(
                    f"--output-dir {self.path} is in use by another hiftune train run "
                    f"(pid {holder}); choose another --output-dir or wait for it to end"
                ) from None
            # The previous holder may have removed the file between our open and lock: then we
            # hold a lock on a file nobody else will see, and must lock the new one instead.
            if lock.exists() and os.path.samestat(os.fstat(f.fileno()), lock.stat()):
                break
            f.close()
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def _check_contents(self) -> None:
        if self.resuming is not None and self.resuming.parent.resolve() == self.path.resolve():
            return  # continuing the run that is here
        previous = sorted(self.path.glob("checkpoint-*")) + [
            p for p in (self.path / name for name in RUN_FILES) if p.exists()
        ]
        if not previous:
            return
        if not self.overwrite:
            raise UserError(
                f"--output-dir {self.path} holds another run ({previous[0].name}); resume it with "
                f"--resume {self.path}, choose another --output-dir, or pass --overwrite-output-dir"
            )
        logger.warning("overwriting the run in %s", self.path)
        for p in previous:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
