"""Write failures of a run as one line: a full disk, a read-only or misnamed output directory.

A run writes into its output directory at three points: checkpoints (inside ``Trainer.train``),
the final model, and the report. Each failure becomes a :class:`WriteError` naming the path and
the reason (``ENOSPC`` -> ``No space left on device``); what was half-written is removed, so no
partial file is left to be trusted later; and the message says which checkpoint is still good.
:func:`check_output_dir` refuses an unusable output directory before the model is loaded.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UserError, first_line
from .checkpoints import MANIFEST
from .filemodes import match_new_files
from .launch import resume_command

#: Below this many free bytes, a write error without an errno is taken for a full disk (torch's
#: zip writer reports ENOSPC only as "unexpected pos" / "file write failed").
NEARLY_FULL = 1 << 20
#: Messages of writers that lose the errno (torch's zip writer, safetensors).
_WRITE_FAILED = re.compile(
    r"PytorchStreamWriter|unexpected pos|file write failed|No space left|Disk quota|I/O error",
    re.IGNORECASE,
)
_FINAL_TMP = ".final-save.tmp"


class WriteError(UserError):
    """A file of the run could not be written (a user error: the disk or the path)."""


def check_output_dir(path: Path) -> None:
    """Checks that ``path`` is, or can be made, a directory that files can be written in.

    A directory created for the check is removed again (the run creates it when it starts).

    Raises:
        WriteError: If ``path`` is a file, cannot be created, or is not writable.
    """
    if path.exists() and not path.is_dir():
        raise WriteError(f"--output-dir {path} is a file, not a directory")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = write_failure_reason(e, path)
        raise WriteError(f"cannot create --output-dir {path}: {reason}") from e
    try:
        with tempfile.TemporaryFile(dir=path, prefix=".hiftune-write-test-") as f:
            f.write(b"0")
            f.flush()
    except OSError as e:
        reason = write_failure_reason(e, path)
        raise WriteError(f"--output-dir {path} is not writable: {reason}") from e
    finally:
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()


def is_write_failure(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it was raised from) is a failed file write."""
    for err in _chain(e):
        if isinstance(err, OSError) and err.errno is not None:
            return True
        if type(err).__name__ in ("SafetensorError", "RuntimeError") and _WRITE_FAILED.search(
            str(err)
        ):
            return True
    return False


def write_failure_reason(e: BaseException, path: Path) -> str:
    """Why a write failed, in words: the errno's text, else a full disk, else the message."""
    for err in _chain(e):
        if isinstance(err, OSError) and err.errno is not None:
            return os.strerror(err.errno)
    if _free_bytes(path) < NEARLY_FULL:
        return os.strerror(errno.ENOSPC)
    return first_line(e)


def _failed_path(e: BaseException) -> Path | None:
    for err in _chain(e):
        if isinstance(err, OSError) and err.filename:
            return Path(os.fsdecode(err.filename))
    return None


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _free_bytes(path: Path) -> int:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return NEARLY_FULL
    return NEARLY_FULL


def last_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint in ``out_dir`` (one with its checksum manifest), if any."""
    done = [p for p in out_dir.glob("checkpoint-*") if (p / MANIFEST).is_file()]
    numbered = [p for p in done if p.name.removeprefix("checkpoint-").isdigit()]
    return max(numbered, key=lambda p: int(p.name.removeprefix("checkpoint-")), default=None)


def _keeping(out_dir: Path) -> str:
    last = last_checkpoint(out_dir)
    if last is None:
        return "no checkpoint was saved before (--save-steps N keeps some)"
    return f"the last checkpoint {last} is kept: resume with {resume_command(last)}"


@contextlib.contextmanager
def checkpoint_writes(out_dir: Path, trainer: Any) -> Iterator[None]:
    """Turns a failed checkpoint write during ``trainer.train()`` into a :class:`WriteError`.

    The checkpoint being written (``checkpoint-<step>`` without the checksum manifest, which
    :class:`~hiftune.recipes.callbacks.Progress` adds last, once everything else is saved) is
    removed, so that no partial checkpoint is left on the full disk.
    """
    try:
        yield
    except Exception as e:
        if not is_write_failure(e):
            raise
        partial = out_dir / f"checkpoint-{trainer.state.global_step}"
        removed = ""
        if partial.is_dir() and not (partial / MANIFEST).is_file():
            where = partial
            shutil.rmtree(partial, ignore_errors=True)
            removed = " (the partial checkpoint was removed)"
        else:  # not a checkpoint: e.g. paging optimizer state to --offload disk
            where = _failed_path(e) or out_dir
        raise WriteError(
            f"cannot write {where} after step {trainer.state.global_step}: "
            f"{write_failure_reason(e, where)}{removed}; {_keeping(out_dir)}"
        ) from e


def save_final_model(trainer: Any, out_dir: Path) -> None:
    """``trainer.save_model(out_dir)``, all or nothing.

    The model is written into a temporary directory inside ``out_dir`` and its files moved into
    place only when all were written, with the mode of any new file of the user's (safetensors
    writes its file private, 0600); if writing fails, the temporary directory is removed.

    Raises:
        WriteError: If the model cannot be written, naming the last checkpoint, which is kept.
    """
    tmp = out_dir / _FINAL_TMP
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        trainer.save_model(str(tmp))
        match_new_files(tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_write_failure(e):
            raise
        raise WriteError(
            f"cannot save the fine-tuned model to {out_dir}: {write_failure_reason(e, out_dir)}; "
            f"{_keeping(out_dir)}"
        ) from e
    for f in tmp.iterdir():
        target = out_dir / f.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(f, target)  # same file system: each file appears whole
    tmp.rmdir()
