"""hiftune: hierarchical full-parameter fine-tuning (HiFT) for PyTorch and Hugging Face models.

The public API is small::

    from hiftune import HiFTConfig, HiFTOptimizer

Everything else stays importable from its module (e.g. ``hiftune.engine.state.host.HostStore``,
``hiftune.integrations.transformers.HiFTTrainer``); see ``docs/design.md`` for the layers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0.dev0"

#: Public name -> the module that defines it. Imported on first use: ``import hiftune`` (which
#: every ``hiftune`` command runs first, ``--help`` and ``--version`` too) does not load torch.
_EXPORTS = {
    "DelayedLR": ".engine.schedule.delay",
    "DiskStore": ".engine.state.paging",
    "HiFTConfig": ".engine.config",
    "HiFTOptimizer": ".engine.optimizer",
    "StateStore": ".engine.state.paging",
    "split_units": ".engine.split.units",
}

if TYPE_CHECKING:
    from .engine.config import HiFTConfig
    from .engine.optimizer import HiFTOptimizer
    from .engine.schedule.delay import DelayedLR
    from .engine.split.units import split_units
    from .engine.state.paging import DiskStore
    from .engine.state.store import StateStore

__all__ = [
    "DelayedLR",
    "DiskStore",
    "HiFTConfig",
    "HiFTOptimizer",
    "StateStore",
    "__version__",
    "split_units",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
