"""hiftune: hierarchical full-parameter fine-tuning (HiFT) for PyTorch and Hugging Face models.

The public API is flat and small::

    from hiftune import HiFTConfig, HiFTOptimizer
"""

from .config import HiFTConfig
from .optimizer import DelayedLR, HiFTOptimizer
from .paging import DiskStore, HostStore, KeepStore, StateStore
from .precision import LossScaler
from .units import ARCHITECTURES, ArchitectureHints, Unit, find_blocks, group_units, split_units

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "ArchitectureHints",
    "DelayedLR",
    "DiskStore",
    "HiFTConfig",
    "HiFTOptimizer",
    "HostStore",
    "KeepStore",
    "LossScaler",
    "StateStore",
    "Unit",
    "__version__",
    "find_blocks",
    "group_units",
    "split_units",
]
