"""Trainer checkpoints of a model sharded with FSDP2: whole weights, per-rank optimizer state.

A model sharded by :func:`hiftune.engine.fsdp.shard_by_units` holds ``DTensor`` shards. The
Trainer's own checkpoint code would write rank 0's shards only. Here the weights are gathered into
one ordinary ``model.safetensors`` (so the checkpoint loads with ``from_pretrained`` anywhere),
and each rank writes the optimizer state of its own shards to ``hift-optimizer-rank<r>-of-<N>.pt``;
a checkpoint therefore resumes on the same number of processes (the optimizer's shards are cut for
N ranks), and says so otherwise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from ..engine.distributed import is_sharded
from ..engine.optimizer import HiFTOptimizer

__all__ = [
    "full_weights",
    "is_fsdp2_model",
    "load_full_weights",
    "load_optimizer_shard",
    "optimizer_shard_path",
]


def is_fsdp2_model(model: nn.Module | None) -> bool:
    """Whether ``model`` holds sharded (``DTensor``) parameters."""
    return model is not None and any(is_sharded(p) for p in model.parameters())


def full_weights(model: nn.Module) -> dict[str, Any]:
    """The whole weights on CPU, on rank 0 (empty elsewhere): a collective, call it on every rank."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def load_full_weights(model: nn.Module, checkpoint: str | Path) -> None:
    """Loads a checkpoint's ``model.safetensors`` (or its shards) into the sharded ``model``.

    Every rank reads the file and keeps its own shards (no communication).
    """
    checkpoint = Path(checkpoint)
    index = checkpoint / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [SAFE_WEIGHTS_NAME]
    state: dict[str, Any] = {}
    for name in files:
        state.update(load_file(str(checkpoint / name)))
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def optimizer_shard_path(directory: str | Path, rank: int, world: int) -> Path:
    """The file of rank ``rank``'s optimizer state in a checkpoint of ``world`` processes."""
    return Path(directory) / f"hift-optimizer-rank{rank}-of-{world}.pt"


def load_optimizer_shard(
    hift: HiFTOptimizer, checkpoint: str | Path, rank: int, world: int
) -> None:
    """Loads this rank's optimizer state from ``checkpoint``.

    Raises:
        ValueError: If the checkpoint was written by another number of processes, or holds no
            per-rank optimizer state.
    """
    path = optimizer_shard_path(checkpoint, rank, world)
    if not path.is_file():
        found = sorted(Path(checkpoint).glob("hift-optimizer-rank*-of-*.pt"))
        worlds = {int(m.group(1)) for f in found if (m := re.search(r"-of-(\d+)\.pt$", f.name))}
        if worlds:
            raise ValueError(
                f"{checkpoint} was written by {', '.join(map(str, sorted(worlds)))} processes; "
                f"HiFT over FSDP2 resumes on the same number of processes, not {world} (each "
                "rank's optimizer state holds the shards of that many ranks)"
            )
        raise ValueError(f"{checkpoint} holds no HiFT optimizer state for an FSDP2 model")
    # The state holds DTensor shards, which only a full unpickler rebuilds; this rank wrote it.
    hift.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
