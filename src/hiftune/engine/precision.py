"""Hierarchical mixed precision: half-precision weights, fp32 masters for the active group only.

Standard mixed precision keeps an fp32 master copy of *every* weight on the device next to the
half-precision model. HiFT steps one group at a time, so only that group's masters (and optimizer
state) need to be on the device; the rest are paged like optimizer state. This module holds the two
pieces that are specific to precision: the dtype table and the dynamic loss scaler for fp16.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


class LossScaler:
    """Dynamic loss scaling for fp16 training.

    The loss is multiplied by ``scale`` before ``backward`` so that small gradients survive fp16.
    When the gradients of a step contain ``inf`` or ``nan`` the step is skipped (weights and
    optimizer state untouched) and the scale halves; after ``growth_interval`` good steps in a row
    it doubles. Overflowing gradients are never replaced by anything.

    Args:
        init_scale: The initial scale.
        growth_interval: Good steps in a row before the scale doubles.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.scale = float(init_scale)
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.skipped_steps = 0

    def found_overflow(self, grads: Iterable[torch.Tensor]) -> bool:
        """Whether any of ``grads`` holds a non-finite value (one device sync per device)."""
        flags = [torch.logical_not(torch.isfinite(g).all()) for g in grads]
        return bool(torch.stack([f.to(flags[0].device) for f in flags]).any()) if flags else False

    def update(self, overflow: bool) -> None:
        """Adjusts the scale after a step that did (or did not) overflow."""
        if overflow:
            self.scale /= 2.0
            self.good_steps = 0
            self.skipped_steps += 1
            logger.warning(
                "fp16 gradient overflow: step skipped, loss scale lowered to %g", self.scale
            )
        else:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale *= 2.0
                self.good_steps = 0

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state as plain values."""
        return {
            "scale": self.scale,
            "good_steps": self.good_steps,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output."""
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped_steps = int(state["skipped_steps"])
