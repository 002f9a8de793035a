"""hiftune: hierarchical full-parameter fine-tuning (HiFT) for PyTorch and Hugging Face models.

The public API is small::

    from hiftune import HiFTConfig, HiFTOptimizer

Everything else stays importable from its module (e.g. ``hiftune.engine.paging.HostStore``,
``hiftune.integrations.transformers.HiFTTrainer``); see ``docs/design.md`` for the layers.
"""

from .engine.config import HiFTConfig
from .engine.delay import DelayedLR
from .engine.optimizer import HiFTOptimizer
from .engine.paging import DiskStore, StateStore
from .engine.units import split_units

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
