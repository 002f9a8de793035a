"""Named optimizers: the one vocabulary that ``estimate``, ``profile`` and ``train`` share.

Each name means one optimizer class with one set of default arguments everywhere, so that
``hiftune estimate --optimizer adafactor`` predicts the optimizer that ``hiftune profile`` measures
and ``hiftune train`` trains with. The table is data: a dotted class path and keyword arguments.
Classes are imported only when a name is resolved, so the engine itself never imports
``transformers`` (only resolving ``"adafactor"`` does). Any other optimizer is reachable by its
dotted class path (e.g. ``"torch.optim.RMSprop"``); :class:`~hiftune.HiFTOptimizer` itself takes
any class directly and needs no name at all.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from ..errors import UserError

#: How an optimizer is applied to a model: HiFT (one group per step) or plain full fine-tuning.
METHODS = ("hift", "fpft")


@dataclass(frozen=True)
class NamedOptimizer:
    """One entry of :data:`OPTIMIZERS`.

    Attributes:
        path: Dotted path of the optimizer class, imported on :meth:`load`.
        defaults: Keyword arguments every user of the name passes (the learning rate is the
            caller's, since it is a training choice, not part of the optimizer's identity).
        help: One line for ``--help`` texts and docs.
    """

    path: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    help: str = ""

    def load(self) -> type[torch.optim.Optimizer]:
        """Imports and returns the optimizer class."""
        return _import_class(self.path)


#: Optimizer name -> class and default keyword arguments.
OPTIMIZERS: Mapping[str, NamedOptimizer] = MappingProxyType(
    {
        "adamw": NamedOptimizer("torch.optim.AdamW", {}, "torch.optim.AdamW"),
        "sgd": NamedOptimizer("torch.optim.SGD", {}, "torch.optim.SGD without momentum"),
        "sgdm": NamedOptimizer(
            "torch.optim.SGD", {"momentum": 0.9}, "torch.optim.SGD with momentum 0.9"
        ),
        "adagrad": NamedOptimizer("torch.optim.Adagrad", {}, "torch.optim.Adagrad"),
        # transformers' Adafactor (the one the Hugging Face Trainer's optim="adafactor" uses),
        # with a fixed learning rate so that it follows the caller's schedule like the others.
        "adafactor": NamedOptimizer(
            "transformers.optimization.Adafactor",
            {"scale_parameter": False, "relative_step": False, "warmup_init": False},
            "transformers' Adafactor with an external learning rate (relative_step=False)",
        ),
    }
)


def resolve_optimizer(
    name: str, **kwargs: Any
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The optimizer class and keyword arguments for a name.

    Args:
        name: A key of :data:`OPTIMIZERS`, or the dotted path of any optimizer class
            (e.g. ``"torch.optim.RMSprop"``), which then gets no default arguments.
        **kwargs: The caller's arguments (e.g. ``lr``); they override the defaults.

    Returns:
        ``(optimizer_cls, kwargs)``, ready for ``HiFTOptimizer(model, cls, config, **kwargs)``
        or ``Trainer(optimizer_cls_and_kwargs=...)``.

    Raises:
        UserError: If the name is unknown or its class cannot be imported.
    """
    entry = OPTIMIZERS.get(name)
    if entry is not None:
        return entry.load(), {**entry.defaults, **kwargs}
    if "." not in name:
        raise UserError(
            f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)} or a dotted class "
            "path such as torch.optim.RMSprop"
        )
    return _import_class(name), dict(kwargs)


def _import_class(path: str) -> type[torch.optim.Optimizer]:
    module, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot import optimizer class {path!r}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise UserError(f"{path!r} is not a torch.optim.Optimizer subclass")
    return cls
