"""hiftune: hierarchical full-parameter fine-tuning (HiFT) for PyTorch and Hugging Face models.

The public API is small::

    from hiftune import HiFTConfig, HiFTOptimizer

Everything else stays importable from its module (e.g. ``hiftune.engine.state.paging.HostStore``,
``hiftune.integrations.transformers.HiFTTrainer``); see ``docs/design.md`` for the layers.
"""

from .engine.config import HiFTConfig
from .engine.optimizer import HiFTOptimizer
from .engine.schedule.delay import DelayedLR
from .engine.split.units import split_units
from .engine.state.paging import DiskStore, StateStore

__version__ = "0.2.0.dev0"

__all__ = [
    "DelayedLR",
    "DiskStore",
    "HiFTConfig",
    "HiFTOptimizer",
    "StateStore",
    "__version__",
    "split_units",
]
