"""The command that continues a run, as it works where the user is.

A run that stops with a checkpoint says how to resume it. ``hiftune train --resume ...`` fails
when ``hiftune`` is not on the ``PATH``, as under ``make run`` (which calls ``.venv/bin/hiftune``
without activating the virtual environment), or when the ``hiftune`` on the ``PATH`` is another
installation. :func:`hiftune_command` says how this process's hiftune is started from the current
directory: ``hiftune`` if that is the one the shell finds, else the path of its console script
(relative to the current directory when under it), else ``python -m hiftune`` with this
process's interpreter.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path

NAME = "hiftune"


def hiftune_command() -> str:
    """The shell words that run this process's hiftune from the current directory.

    The console script that started this process (``sys.argv[0]``), else the one installed
    beside this interpreter, is named ``hiftune`` when the shell finds that very file by that
    name, else by its path; without a console script, ``<python> -m hiftune``.
    """
    script = _console_script()
    if script is not None:
        found = shutil.which(NAME)
        if found is not None and _same_file(Path(found), script):
            return NAME
        return _shell_path(script)
    return f"{_python()} -m {NAME}"


def resume_command(checkpoint: Path) -> str:
    """The command that resumes a run from ``checkpoint``, e.g. ``hiftune train --resume X``."""
    return f"{hiftune_command()} train --resume {shlex.quote(str(checkpoint))}"


def _console_script() -> Path | None:
    """hiftune's console script: the one that started this process, else this interpreter's."""
    started = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if started is not None and started.name == NAME and started.is_file():
        return started
    installed = Path(sysconfig.get_path("scripts")) / NAME
    return installed if installed.is_file() else None


def _python() -> str:
    """This interpreter, as the shell can start it: ``python3`` if that is it, else its path.

    Compared as paths, not as the files they lead to: a virtual environment's ``python`` is a
    link to the system's, which has none of the environment's packages.
    """
    executable = Path(sys.executable).absolute()
    for name in ("python", "python3"):
        found = shutil.which(name)
        if found is not None and Path(found).absolute() == executable:
            return name
    return _shell_path(executable)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _shell_path(path: Path) -> str:
    """``path`` relative to the current directory when under it (``.venv/bin/hiftune``), else
    absolute; quoted for the shell."""
    absolute = Path(os.path.abspath(path))
    try:
        shown = str(absolute.relative_to(Path.cwd()))
    except ValueError:
        shown = str(absolute)
    if os.sep not in shown:  # a bare name would be looked up on the PATH
        shown = f".{os.sep}{shown}"
    return shlex.quote(shown)
