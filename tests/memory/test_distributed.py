"""Per-rank memory predictions, against the real optimizer's state and the modes' arithmetic."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from hiftune import HiFTConfig, HiFTOptimizer
from hiftune.engine.split.units import group_units, split_units
from hiftune.errors import UserError
from hiftune.memory.distributed import MiB, estimate_per_rank
from tinymodels import tiny_hf_config


def _config():
    config = tiny_hf_config("llama")
    config.hidden_size, config.intermediate_size = 64, 128
    return config


def test_dp_predicts_the_state_the_optimizer_keeps():
    # On a CPU the host store keeps every group's AdamW state: after one cycle that is the
    # predicted paged state plus the peak group's state.
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(_config())
    opt = HiFTOptimizer(model, torch.optim.AdamW, HiFTConfig(), lr=1e-3)
    ids = torch.randint(0, 64, (2, 8))
    for _ in range(opt.num_groups):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    (rank,) = estimate_per_rank(_config(), processes=1, mode="dp")
    predicted = (rank.paged_mib + rank.device_states_mib) * MiB
    assert predicted == pytest.approx(opt.store.resident_bytes(), rel=0.01)
    params = sum(p.numel() for p in model.parameters())
    assert rank.device_weights_mib * MiB == params * 4
    assert rank.comm_mib_per_step == 0


def test_two_processes_per_mode():
    dp = estimate_per_rank(_config(), processes=2, mode="dp")
    sharded = estimate_per_rank(_config(), processes=2, mode="sharded")
    fsdp = estimate_per_rank(_config(), processes=2, mode="fsdp2")
    (one,) = estimate_per_rank(_config(), processes=1, mode="dp")
    # Data parallelism replicates: each rank as one process, plus the gradient all-reduce.
    assert [r.total_mib for r in dp] == [one.total_mib] * 2
    assert dp[0].comm_mib_per_step == pytest.approx(one.device_grads_mib)  # 2(N-1)/N = 1
    # Sharded state: the ranks' state adds up to one process's (each group kept once) ...
    model = T.AutoModelForCausalLM.from_config(_config())
    groups = group_units(split_units(model), 1)
    assert len(groups) >= 4
    total_state = one.paged_mib + one.device_states_mib
    kept = [r.paged_mib + r.device_states_mib for r in sharded]
    assert max(kept) < 0.75 * total_state
    assert all(r.device_weights_mib == one.device_weights_mib for r in sharded)
    # ... and FSDP2 halves weights and state, plus two all-gathered modules (one computing, one
    # prefetched): the largest of the blocks and the root's rest (embedding, head).
    assert fsdp[0].paged_mib == pytest.approx(one.paged_mib / 2, rel=0.01)
    params = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    root = params - len(model.model.layers) * block
    expected = (params / 2 + 2 * max(block, root)) * 4
    assert fsdp[0].device_weights_mib * MiB == pytest.approx(expected, abs=8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"processes": 0}, "processes"),
        ({"processes": 2, "mode": "zero3"}, "mode"),
        ({"processes": 2, "mode": "sharded", "precision": "bf16"}, "fp32"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        estimate_per_rank(_config(), **kwargs)
