"""``hiftune estimate``: argument parsing, then a call into the library."""

from ..memory.estimate import add_arguments, run

__all__ = ["add_arguments", "run"]
