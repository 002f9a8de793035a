"""Temporary directories that name their owner, and removing those of processes that are gone.

A process killed with ``kill -9`` (or by a scheduler's SIGKILL after SIGTERM) never runs its
cleanup, so a ``DiskStore`` temporary directory, which can hold a whole model's optimizer state,
would stay in ``/tmp`` for good. Each directory made here is named ``<prefix><pid>-<random>`` and
holds an ``owner.lock`` that its process keeps locked (``flock``) while the directory is in use.
:func:`make_owned_temp_dir` first removes the directories of the same prefix whose process is
dead *and* whose lock is free. The lock is what protects a live process whose pid means nothing
here (another container sharing ``/tmp``) or whose pid was reused; the pid check alone would
be fooled by the first, the lock alone by a directory made just before its lock was taken.

Only POSIX systems clean up (there ``os.kill(pid, 0)`` probes a process without touching it);
elsewhere directories are still named by pid and removed by their own process only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_NAME = "owner.lock"

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


class OwnedDir:
    """A temporary directory and the lock that marks it as in use by this process.

    Attributes:
        path: The directory.
    """

    def __init__(self, path: Path, lock_fd: int | None) -> None:
        self.path = path
        self._lock_fd = lock_fd

    def remove(self) -> None:
        """Deletes the directory, then drops the lock (safe to call more than once)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None


def make_owned_temp_dir(prefix: str) -> OwnedDir:
    """Creates ``<tmp>/<prefix><pid>-<random>``, locked, after removing stale ones of ``prefix``.

    Args:
        prefix: E.g. ``"hiftune-state-"``.
    """
    remove_stale_dirs(prefix)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))
    return OwnedDir(path, _lock(path / LOCK_NAME, blocking=True))


def remove_stale_dirs(prefix: str, root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Removes ``<root>/<prefix><pid>-*`` directories of this user whose process is gone.

    A directory is left alone if its process is alive (or might be: another user's), if another
    process holds its lock, or if it is not ours to delete.

    Args:
        prefix: The prefix the directories were made with.
        root: Where to look; the system's temporary directory by default.

    Returns:
        The directories removed.
    """
    if os.name != "posix":
        return []
    pattern = re.compile(re.escape(prefix) + r"(\d+)-")
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{prefix}*"):
        match = pattern.match(path.name)
        if match is None or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        try:
            if not path.is_dir() or path.is_symlink() or path.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue  # removed meanwhile
        lock = path / LOCK_NAME
        fd = _lock(lock, blocking=False) if lock.exists() else None
        if lock.exists() and fd is None:
            continue  # its owner still holds the lock: a live process under a pid we cannot see
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            if fd is not None:
                os.close(fd)
        logger.info("removed %s, left behind by process %s", path, match.group(1))
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists (POSIX)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, but belongs to someone else
    return True


def _lock(path: Path, *, blocking: bool) -> int | None:
    """An open, ``flock``-ed file descriptor of ``path``, or ``None`` if locked elsewhere."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd
