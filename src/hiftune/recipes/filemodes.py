"""The run's files get the permissions of any new file of the user's, whoever wrote them.

safetensors writes ``model.safetensors`` as a private temporary file (mode 0600) and renames it
into place, so a fine-tuned model or checkpoint would be unreadable for the rest of the user's
group, unlike every other file of the run. :func:`match_new_files` gives such files the mode a
file newly created in their directory gets: 0666 less the umask (0644 under umask 022), or what
the directory's default ACL grants. It is measured, by creating an empty file, rather than
computed, since only the file system knows about ACLs.
"""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

#: The permission bits a mode holds (not the file type, nor setuid/setgid/sticky).
PERMISSIONS = 0o777


def new_file_mode(directory: Path) -> int:
    """The permission bits a file newly created in ``directory`` gets (umask and ACL applied).

    Raises:
        OSError: If no file can be created in ``directory``.
    """
    probe = directory / f".hiftune-mode-{uuid.uuid4().hex}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode) & PERMISSIONS
    finally:
        os.close(fd)
        probe.unlink()


def match_new_files(root: Path) -> None:
    """Gives every regular file under ``root`` (a directory, recursively) the mode of a new file.

    Call it once the files are written and before anything records their state (checksums read
    the content only, and a mode change leaves the modification time alone).

    Raises:
        OSError: If ``root`` cannot be written or a file's mode cannot be changed.
    """
    mode = new_file_mode(root)
    for path in root.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        if (stat.S_IMODE(path.stat().st_mode) & PERMISSIONS) != mode:
            path.chmod(mode)
