"""The importance order (experimental): the next group drawn by its gradients, with a floor.

The paper's orders visit every group once per cycle whatever it would gain. Block methods that
choose by importance (MISA, BlockLLM) spend more updates on the modules whose gradients are
large. ``HiFTConfig(order="importance")`` does the same on HiFT's groups:

* the first cycle visits every group once, bottom-up, and measures each one;
* after that, each visit goes to a group drawn with probability
  ``floor / k + (1 - floor) * score / sum(scores)``, where a group's score is the mean squared
  gradient of its parameters (per element, so that large groups are not favoured for their size)
  at the last step it trained. ``floor`` (``HiFTConfig.importance_floor``) is the share spread
  evenly, so every group keeps at least ``floor / k`` of the visits: none starves.

A training group's gradients shrink as it learns, so its score falls and the others catch up.
The draw for visit ``v`` uses a private generator seeded by ``(seed, v)``: every data-parallel
rank (which sees the same averaged gradients) draws the same group, and a resumed run draws what
the uninterrupted one would have drawn. The scores travel in the optimizer's state dict.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


def mean_square(grads: Iterable[torch.Tensor | None]) -> float:
    """The mean of the squared gradient entries (``None`` gradients count as absent)."""
    total, count = 0.0, 0
    for g in grads:
        if g is None:
            continue
        total += float(g.detach().float().pow(2).sum())
        count += g.numel()
    return total / count if count else 0.0


@dataclass
class ImportanceSampler:
    """Draws the next group from the groups' last measured scores.

    Attributes:
        num_groups: k.
        seed: Seed of the draws (with the visit index).
        floor: Share of the probability spread evenly over the groups (0 < floor <= 1).
        scores: Each group's last score by bottom-up id; ``None`` until it has trained once.
    """

    num_groups: int
    seed: int = 0
    floor: float = 0.5
    scores: list[float | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.scores:
            self.scores = [None] * self.num_groups

    def observe(self, group: int, score: float) -> None:
        """Records ``group``'s score (see :func:`mean_square`) at the step it just took."""
        self.scores[group] = score if math.isfinite(score) and score >= 0 else None

    def probabilities(self) -> list[float]:
        """Each group's chance of the next visit (groups not yet measured share evenly)."""
        k = self.num_groups
        known = [s for s in self.scores if s is not None]
        mean = sum(known) / len(known) if known else 0.0
        # A group not measured yet (or whose last score was not finite) counts as average.
        scores = [mean if s is None else s for s in self.scores]
        total = sum(scores)
        if total <= 0:
            return [1.0 / k] * k
        return [self.floor / k + (1.0 - self.floor) * s / total for s in scores]

    def choose(self, visit: int) -> int:
        """The group of visit ``visit`` (counted from 0 over the whole run) after the first cycle."""
        r = random.Random(f"hiftune-importance:{self.seed}:{visit}").random()
        acc = 0.0
        probs = self.probabilities()
        for b, p in enumerate(probs):
            acc += p
            if r < acc:
                return b
        return len(probs) - 1  # r within rounding of 1.0

    def to_meta(self) -> list[float | None]:
        """The scores, for the state dict."""
        return list(self.scores)

    def load_meta(self, scores: Sequence[Any] | None) -> None:
        """Restores :meth:`to_meta` output; ``None`` (a checkpoint of another order) starts over."""
        if scores is None:
            self.scores = [None] * self.num_groups
            return
        self.scores = [None if s is None else float(s) for s in scores]


def check_scores(meta: Mapping[str, Any], num_groups: int) -> str | None:
    """Why a state dict's ``importance_scores`` entry is damaged; ``None`` when it is fine."""
    scores = meta.get("importance_scores")
    if scores is None:
        return None
    if not isinstance(scores, Sequence) or len(scores) != num_groups:
        return f"its importance scores {scores!r} are not one per group ({num_groups})"
    for s in scores:
        if s is not None and (
            isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0
        ):
            return f"its importance score {s!r} is not a finite number >= 0"
    return None
