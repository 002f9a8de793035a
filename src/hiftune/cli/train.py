"""``hiftune train``: argument parsing, then a call into the library."""

from ..recipes.train import add_arguments, run

__all__ = ["add_arguments", "run"]
