"""One run per output directory: an exclusive lock held for the whole run, and no silent mixing.

Two runs writing into one directory interleave their checkpoints, run file and model, and a later
``--resume`` continues one run's weights under the other's name. :class:`OutputDir` takes an
exclusive ``fcntl.flock`` on a lock file in the directory (released by the kernel when the process
ends, however it ends, so a crashed run never leaves a stale lock) and refuses a directory that
holds another run, unless the run resumes a checkpoint of that directory or was asked to
overwrite it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import IO

from ..errors import UserError
from .config import RUN_CONFIG

logger = logging.getLogger(__name__)

LOCK = ".hiftune.lock"
#: What a finished or interrupted run leaves, besides the model: removed by ``overwrite`` (the
#: model files are replaced by the new run's own).
RUN_FILES = (RUN_CONFIG, "report.json", "report.md", "loss.png", "memory.png")


class OutputDir:
    """Holds an output directory for one run (a context manager).

    On entry it creates the directory, locks it and checks what it holds; on exit it unlocks it
    (and removes it again if the run failed before writing anything into it).

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
        # Removed while still locked, so no other run can lock the file that is being removed.
        if self._created and [p.name for p in self.path.iterdir()] == [LOCK]:
            (self.path / LOCK).unlink()
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
