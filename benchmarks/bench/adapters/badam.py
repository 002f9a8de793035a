"""BAdam (``badam``): block coordinate descent, one block trained with Adam at a time."""

from __future__ import annotations

import time
from typing import Any

import torch
from badam import BlockOptimizer
from torch import nn

from . import LossFn, Trainer, linear_decay


class _BAdamTrainer(Trainer):
    """Records the time of each block switch, so the report can amortise it over the default
    ``switch_block_every`` when the benchmark switches more often (see ``bench.worker``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.switch_s = 0.0
        opt: Any = self.optimizer
        switch = opt.switch_trainable_params

        def timed_switch(*a: Any, **k: Any) -> None:
            t = time.perf_counter()
            switch(*a, **k)
            self.switch_s += time.perf_counter() - t

        # An instance attribute shadowing the method: BAdam's own code runs unchanged.
        opt.switch_trainable_params = timed_switch


def build(
    model: nn.Module,
    loss_fn: LossFn,
    lr: float,
    total_steps: int,
    *,
    include_embedding: bool = False,
    include_lm_head: bool = False,
    switch_block_every: int = 50,
    block_prefix_list: list[list[str]] | None = None,
    active_modules: list[str] | None = None,
) -> Trainer:
    """``BlockOptimizer`` around ``torch.optim.AdamW``, as BAdam's README shows.

    BAdam expects a half-precision model and keeps fp32 copies of the active block only. Its
    defaults leave the embedding and the LM head (and everything outside the blocks) frozen;
    ``include_embedding`` / ``include_lm_head`` add them as blocks of their own.
    ``block_prefix_list`` gives the blocks explicitly (for models whose blocks are not named
    ``layers.N``). ``active_modules`` are name prefixes trained at every step besides the active
    block (BAdam's way to keep a new classification head trainable); BAdam resets the Adam
    state of everything it trains, these included, at each block switch.
    """
    base = torch.optim.AdamW(model.parameters(), lr=lr)
    opt = BlockOptimizer(
        base_optimizer=base,
        named_parameters_list=list(model.named_parameters()),
        block_prefix_list=block_prefix_list,
        switch_block_every=switch_block_every,
        switch_mode="descending",  # BAdam's default order
        include_embedding=include_embedding,
        include_lm_head=include_lm_head,
        active_modules=list(active_modules or []),
        verbose=0,
    )
    return _BAdamTrainer(model, loss_fn, opt, linear_decay(opt, total_steps))
