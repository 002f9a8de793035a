"""The resume command a stopped run prints works where the user is, however hiftune was started."""

from __future__ import annotations

import shutil
import sys
import sysconfig
from pathlib import Path

import pytest

from hiftune.recipes import launch
from hiftune.recipes.launch import hiftune_command, resume_command


@pytest.fixture
def venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project directory (the current one) with ``.venv/bin/hiftune`` and ``.venv/bin/python``,
    the interpreter of this process; nothing on the ``PATH`` unless a test puts it there."""
    bin_dir = tmp_path / "project" / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "hiftune").write_text("#!/bin/sh\n")
    (bin_dir / "python").write_text("")
    monkeypatch.chdir(tmp_path / "project")
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(bin_dir))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    return bin_dir


def test_make_run_the_venv_script_by_its_path(venv: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [".venv/bin/hiftune", "train"])  # as make run starts it
    assert hiftune_command() == ".venv/bin/hiftune"
    checkpoint = Path("runs/smollm2-135m-prompt-cls-hift/checkpoint-37")
    assert resume_command(checkpoint) == (
        ".venv/bin/hiftune train --resume runs/smollm2-135m-prompt-cls-hift/checkpoint-37"
    )


def test_hiftune_when_the_shell_finds_this_very_script(venv: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(venv / "hiftune"), "train"])  # an activated venv
    monkeypatch.setattr(
        shutil, "which", lambda name: str(venv / name) if name == "hiftune" else None
    )
    assert hiftune_command() == "hiftune"


def test_another_hiftune_on_the_path_is_not_this_one(
    venv: Path, tmp_path: Path, monkeypatch
) -> None:
    other = tmp_path / "elsewhere" / "hiftune"
    other.parent.mkdir()
    other.write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "argv", [str(venv / "hiftune"), "train"])
    monkeypatch.setattr(shutil, "which", lambda name: str(other) if name == "hiftune" else None)
    assert hiftune_command() == ".venv/bin/hiftune"


def test_outside_the_project_the_absolute_path(venv: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(venv / "hiftune"), "train"])
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert hiftune_command() == str(venv / "hiftune")


def test_a_script_in_the_current_directory_is_not_looked_up(venv: Path, monkeypatch) -> None:
    monkeypatch.chdir(venv)
    monkeypatch.setattr(sys, "argv", ["hiftune", "train"])
    assert hiftune_command() == "./hiftune"


def test_started_otherwise_the_console_script_of_this_interpreter(venv: Path, monkeypatch) -> None:
    # python -m hiftune, or the user's own script calling the recipe.
    monkeypatch.setattr(sys, "argv", [str(Path(launch.__file__).parent / "__main__.py")])
    assert hiftune_command() == ".venv/bin/hiftune"


def test_without_a_console_script_python_m_hiftune(venv: Path, monkeypatch) -> None:
    (venv / "hiftune").unlink()  # e.g. run from a source tree through PYTHONPATH
    monkeypatch.setattr(sys, "argv", ["-m"])
    assert hiftune_command() == ".venv/bin/python -m hiftune"
    # The venv's python on the PATH (activated) is named; a system python3 is not this one.
    monkeypatch.setattr(shutil, "which", lambda name: str(venv / name))
    assert hiftune_command() == "python -m hiftune"
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/python3")
    assert hiftune_command() == ".venv/bin/python -m hiftune"


def test_a_path_with_spaces_is_quoted(venv: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [".venv/bin/hiftune"])
    assert resume_command(Path("my runs/checkpoint-2")) == (
        ".venv/bin/hiftune train --resume 'my runs/checkpoint-2'"
    )
