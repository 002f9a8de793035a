"""The run's files get the mode of a new file: 0666 less the umask, whatever their writer chose."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hiftune.recipes.filemodes import match_new_files, new_file_mode


@contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_mode_of_a_new_file(tmp_path: Path, mask: int, expected: int) -> None:
    private = tmp_path / "model.safetensors"  # as safetensors leaves it: a renamed mkstemp file
    private.write_bytes(b"weights")
    private.chmod(0o600)
    nested = tmp_path / "checkpoint-2" / "optimizer.pt"
    nested.parent.mkdir()
    nested.write_bytes(b"state")
    nested.chmod(0o640)
    with umask(mask):
        assert new_file_mode(tmp_path) == expected
        match_new_files(tmp_path)
    assert mode(private) == expected and mode(nested) == expected
    assert private.read_bytes() == b"weights"
    # The probe file is gone; the directories keep their own mode.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "model.safetensors"]


def test_links_are_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"x")
    target.chmod(0o600)
    run = tmp_path / "run"
    run.mkdir()
    (run / "link").symlink_to(target)
    with umask(0o022):
        match_new_files(run)
    assert mode(target) == 0o600  # not the run's file
