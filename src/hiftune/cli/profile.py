"""``hiftune profile``: argument parsing, then a call into the library."""

from ..memory.profile import add_arguments, run

__all__ = ["add_arguments", "run"]
