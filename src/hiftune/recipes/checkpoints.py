"""Checkpoint integrity: a checksum manifest written with every checkpoint, and choosing a good one.

The Trainer writes a checkpoint as several files (``model.safetensors``, ``optimizer.pt``,
``scheduler.pt``, ``rng_state.pth``, ``trainer_state.json``) and the recipe adds its run file. A
crash, a full disk or a bad copy can leave any of them truncated or changed, and most such damage
is invisible until the Trainer loads the file (a traceback) or not even then (flipped bytes inside
tensor data load as wrong weights). :func:`write_manifest` records every file's size and SHA-256
once the checkpoint is complete, as its last file; :func:`find_checkpoint` verifies them before a
checkpoint is resumed, and for an output directory picks the newest checkpoint that verifies.

A checkpoint without a manifest is one whose save did not finish, unless no checkpoint beside it
has one (written before manifests existed): those are accepted if their ``trainer_state.json``
parses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from ..errors import UserError
from .filemodes import match_new_files

logger = logging.getLogger(__name__)

#: Written last into every checkpoint: ``{"files": {name: {"bytes": n, "sha256": hex}}}``.
MANIFEST = "hiftune_manifest.json"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
# Verified checkpoints, keyed by path and every listed file's (size, mtime): building the config
# and starting the recipe both look for the checkpoint, and hashing gigabytes twice is slow.
_verified: dict[Path, tuple[Any, ...]] = {}


def write_manifest(checkpoint: Path) -> None:
    """Records the size and SHA-256 of every file in ``checkpoint`` (call once it is complete).

    Written to a temporary name and renamed, so a crash leaves either no manifest or a whole one.
    The checkpoint's files get the mode of any new file of the user's first (the Trainer's
    ``model.safetensors`` comes out private, 0600).
    """
    match_new_files(checkpoint)
    files = {
        p.relative_to(checkpoint).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")
    }
    tmp = checkpoint / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1) + "\n")
    os.replace(tmp, checkpoint / MANIFEST)


def find_checkpoint(resume: str | Path, warn: bool = True) -> Path:
    """The checkpoint ``resume`` means, verified: the directory itself, or its newest good one.

    Args:
        resume: A checkpoint directory, or an output directory holding ``checkpoint-N``
            directories (the newest that verifies is taken).
        warn: Log a warning for each damaged checkpoint skipped.

    Raises:
        UserError: If there is no such directory, it holds no checkpoint, or the checkpoint (or
            every checkpoint of the directory) is damaged; one line naming the damaged file and
            the previous good checkpoint, if any.
    """
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise UserError(f"--resume {path} is not a directory")
    if _is_checkpoint(path):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        siblings = _checkpoints(path.parent)
        earlier = [c for c in siblings if _step(c) < _step(path)]
        good = next((c for c in reversed(earlier) if checkpoint_problem(c) is None), None)
        hint = (
            f"the previous good checkpoint is {good}" if good else "no earlier checkpoint is good"
        )
        raise UserError(f"--resume {path}: {problem}; {hint}")
    found = _checkpoints(path)
    if not found:
        raise UserError(f"--resume {path} holds no checkpoint (no {TRAINER_STATE})")
    problems: list[str] = []
    for checkpoint in reversed(found):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            for skipped in problems if warn else []:
                logger.warning("skipping %s; resuming from %s", skipped, checkpoint.name)
            return checkpoint
        problems.append(f"{checkpoint.name}: {problem}")
    raise UserError(f"--resume {path}: no good checkpoint ({problems[0]})")


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What is wrong with ``checkpoint`` (one phrase naming the file), or ``None`` if it is good."""
    manifest = checkpoint / MANIFEST
    if not manifest.is_file():
        if any((c / MANIFEST).is_file() for c in _checkpoints(checkpoint.parent)):
            return f"{checkpoint / MANIFEST} is missing (its save did not finish)"
        return _trainer_state_problem(checkpoint)  # written before manifests existed
    try:
        files = json.loads(manifest.read_text())["files"]
        listed = {name: (int(f["bytes"]), str(f["sha256"])) for name, f in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{manifest} is damaged ({type(e).__name__})"
    try:
        signature = tuple(
            (name, (checkpoint / name).stat().st_size, (checkpoint / name).stat().st_mtime_ns)
            for name in sorted(listed)
        )
    except OSError:
        signature = None
    if signature is not None and _verified.get(checkpoint.resolve()) == signature:
        return None
    for name, (size, digest) in listed.items():
        file = checkpoint / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} is damaged ({file.stat().st_size} bytes, {size} were saved)"
        if _sha256(file) != digest:
            return f"{file} is damaged (its checksum differs from the saved one)"
    if TRAINER_STATE not in listed:
        return f"{checkpoint / TRAINER_STATE} is missing"
    if signature is not None:
        _verified[checkpoint.resolve()] = signature
    return None


def _trainer_state_problem(checkpoint: Path) -> str | None:
    state = checkpoint / TRAINER_STATE
    try:
        data = json.loads(state.read_text())
    except FileNotFoundError:
        return f"{state} is missing"
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"{state} is damaged ({type(e).__name__})"
    return None if isinstance(data, dict) else f"{state} is damaged (not a JSON object)"


def _is_checkpoint(path: Path) -> bool:
    return (
        (path / TRAINER_STATE).is_file()
        or (path / MANIFEST).is_file()
        or _CHECKPOINT.fullmatch(path.name) is not None
    )


def _step(path: Path) -> int:
    match = _CHECKPOINT.fullmatch(path.name)
    return int(match.group(1)) if match else -1


def _checkpoints(run_dir: Path) -> list[Path]:
    """The ``checkpoint-N`` directories of ``run_dir``, oldest (smallest N) first."""
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and _step(p) >= 0]
    return sorted(found, key=_step)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
