"""Fixed expected losses: a few HiFT steps on a tiny seeded model must keep their exact course.

The other tests compare HiFT with something else (a plain optimizer, a naive loop, another offload
mode); this one pins the numbers themselves, so that a change of behaviour that moves both sides of
such a comparison alike still shows. The constants were produced once by running ``_losses`` for
each case on CPU (PyTorch 2.13, fp32) and printing the values with ``repr``; the tolerance absorbs
the last-bit differences between CPUs and thread counts (below 1e-6 here), not a change of
method: a learning rate 1% off already moves a loss by 2e-4.
"""

import pytest
import torch

from hiftune import HiFTConfig, HiFTOptimizer
from tinymodels import TinyLM, train_steps

CASES = {
    # The paper's split (no unit budget): embedding and positions, 4 blocks, norm and head.
    # AdamW, one unit per group, bottom-up, state paged to disk, delayed decay: 2 cycles of k=6.
    "adamw-m1-bottom2up-disk": (
        torch.optim.AdamW,
        {"lr": 1e-2},
        HiFTConfig(units_per_group=1, order="bottom2up", offload="disk", max_unit_params=None),
        12,
        [
            3.5952751636505127,
            3.527377128601074,
            3.6180765628814697,
            3.607247829437256,
            3.5256807804107666,
            3.660677909851074,
            3.5763907432556152,
            3.6471471786499023,
            3.675708532333374,
            3.4196360111236572,
            3.5323076248168945,
            3.6003363132476807,
        ],
    ),
    # SGD with momentum, two units per group, a seeded random order: 3 cycles of k=3.
    "sgdm-m2-random-host": (
        torch.optim.SGD,
        {"lr": 0.2, "momentum": 0.9},
        HiFTConfig(units_per_group=2, order="random", seed=3, offload="host", max_unit_params=None),
        9,
        [
            3.5952751636505127,
            3.527313470840454,
            3.60862135887146,
            3.6065142154693604,
            3.5384154319763184,
            3.6576414108276367,
            3.5815560817718506,
            3.654090642929077,
            3.6494295597076416,
        ],
    ),
}


def _losses(name: str) -> list[float]:
    optimizer_cls, kwargs, config, steps, _ = CASES[name]
    torch.manual_seed(0)
    model = TinyLM(vocab=32, d=16, layers=4)
    g = torch.Generator().manual_seed(2024)
    data = [torch.randint(0, 32, (4, 12), generator=g) for _ in range(steps)]
    opt = HiFTOptimizer(model, optimizer_cls, config, **kwargs)
    sched = opt.delay(torch.optim.lr_scheduler.LambdaLR(opt, lambda cycle: 0.5**cycle))
    losses = train_steps(model, opt, data, sched)
    opt.close()
    return losses


@pytest.mark.parametrize("name", list(CASES))
def test_losses_match_the_recorded_ones(name):
    expected = CASES[name][-1]
    torch.testing.assert_close(_losses(name), expected, rtol=1e-5, atol=1e-5)
