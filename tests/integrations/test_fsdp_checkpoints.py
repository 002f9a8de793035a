"""Trainer checkpoints of FSDP2 models: the parts that need no process group.

Saving and resuming through the Trainer on 2 processes is tested in test_distributed_trainer.py.
"""

from __future__ import annotations

import pytest
import torch

from hiftune.integrations.fsdp_checkpoints import (
    is_fsdp2_model,
    load_optimizer_shard,
    optimizer_shard_path,
)
from tinymodels import TinyLM


def test_resuming_on_another_number_of_processes_says_why_not(tmp_path):
    for rank in range(2):
        torch.save({}, optimizer_shard_path(tmp_path, rank, 2))
    with pytest.raises(
        ValueError, match=r"written by 2 processes.*same number of processes, not 4"
    ):
        load_optimizer_shard(None, tmp_path, 0, 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no HiFT optimizer state"):
        load_optimizer_shard(None, tmp_path / "nothing", 0, 2)  # type: ignore[arg-type]


def test_a_plain_model_is_not_fsdp2():
    assert not is_fsdp2_model(TinyLM())
    assert not is_fsdp2_model(None)
