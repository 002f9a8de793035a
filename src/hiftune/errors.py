"""User errors: the one exception type the library raises for bad input a user can fix.

A :class:`UserError` says what was wrong and, where it can, what to do instead, in its first line.
The command line prints that line and exits with code 2; a Python caller catches it as a
``ValueError``. Bugs keep their own exception types (and their tracebacks).
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input a user can fix: a missing file, an unknown name, an invalid option value."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if the message is empty)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
