"""Tests of ``hiftune estimate --fit``'s search (:mod:`hiftune.memory.fit`)."""

from __future__ import annotations

import itertools
import math

import pytest

from hiftune.engine.config import OFFLOADS
from hiftune.errors import UserError
from hiftune.memory.estimate import build_meta_model, estimate
from hiftune.memory.fit import FIT_PRECISIONS, batch_steps, fit, step_time, unit_steps


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    return build_meta_model(config)


def test_search_grid():
    assert unit_steps(38) == [1, 2, 4, 8, 16, 32, 38]
    assert unit_steps(4) == [1, 2, 4]
    assert unit_steps(1) == [1]
    assert batch_steps(5) == [5, 2, 1]
    assert batch_steps(1) == [1]
    assert step_time("bf16", "none", False, 0) == 1.0
    assert step_time("fp32", "disk", True, 2) == pytest.approx(2.0 * 1.5 * 1.33 * 1.15**2)


@pytest.fixture(scope="module")
def plans(model):
    """Exhaustive reference: (relative time, device GiB, host GiB, settings) of every plan at
    batch size 2."""
    cache = {}  # forward passes shared, as fit shares them
    units = 8  # embedding and head in 2 row shards each (at the block budget), 4 blocks
    out = []
    for precision, offload, checkpointing, (halvings, batch) in itertools.product(
        FIT_PRECISIONS, OFFLOADS, (False, True), enumerate(batch_steps(2))
    ):
        for m in unit_steps(units):
            row = next(
                r
                for r in estimate(
                    model,
                    units_per_group=m,
                    optimizers=["adamw"],
                    precisions=[precision],
                    batch_size=batch,
                    seq_len=16,
                    gradient_checkpointing=checkpointing,
                    offload=offload,
                    cache=cache,
                )
                if r.method == "hift"
            )
            time = math.ceil(units / m) * step_time(precision, offload, checkpointing, halvings)
            settings = (precision, offload, m, checkpointing, batch)
            out.append((time, row.device_gib, row.host_gib, settings))
    return out


def test_the_plan_is_the_fastest_that_fits_by_exhaustive_search(model, plans):
    from hiftune import HiFTConfig
    from hiftune.engine.split.units import split_model

    assert len(split_model(model, HiFTConfig(units_per_group=1))[0]) == 8
    devices = sorted(d for _, d, _, _ in plans)
    limit = devices[len(devices) // 3]  # a third of the plans fit the device
    host = sorted(h for _, _, h, _ in plans)[len(plans) // 2]
    fitting = [p for p in plans if p[1] <= limit and p[2] <= host]
    best_time = min(t for t, *_ in fitting)
    fastest = min(t for t, *_ in plans)

    answer = fit(model, device_gib=limit, host_gib=host, batch_size=2, seq_len=16)
    p = answer.plan
    assert p is not None and answer.least is None
    settings = (p.precision, p.offload, p.units_per_group, p.gradient_checkpointing, p.batch_size)
    assert p.device_gib <= limit and p.host_gib <= host
    assert any(s == settings and t == pytest.approx(best_time) for t, _, _, s in fitting)
    assert p.relative_time == pytest.approx(best_time / fastest)
    f = answer.fastest
    assert (f.precision, f.offload, f.units_per_group, f.gradient_checkpointing) == (
        "bf16",
        "none",
        8,
        False,
    )
    assert f.relative_time == 1.0 and f.groups == 1 and f.batch_size == 2


def test_nothing_fits_names_the_least_it_would_need(model, plans):
    answer = fit(model, device_gib=1e-4, batch_size=2, seq_len=16)
    assert answer.plan is None
    least = answer.least
    assert least is not None
    settings = (least.precision, least.offload, least.units_per_group, least.batch_size)
    assert settings == ("bf16", "disk", 1, 1) and least.gradient_checkpointing
    # It is the least device memory of every plan.
    assert least.device_gib == pytest.approx(min(d for _, d, _, _ in plans))
    assert answer.to_dict()["plan"] is None


def test_bad_limits_are_user_errors(model):
    with pytest.raises(UserError, match="--fit needs"):
        fit(model, device_gib=0, batch_size=1, seq_len=8)
