"""What stops a HiFTOptimizer: a model cast, moved or re-loaded under it (fp16 divergence: test_faults)."""

import pytest
import torch

from hiftune import HiFTConfig, HiFTOptimizer
from tinymodels import TinyLM, lm_loss, snapshot, train_steps


def _driven(precision="fp32"):
    torch.manual_seed(0)
    model = TinyLM()
    return model, HiFTOptimizer(model, torch.optim.AdamW, HiFTConfig(precision=precision), lr=1e-2)


@pytest.mark.parametrize(
    ("precision", "change", "message"),
    [
        # fp32 state and a bf16 model: a torch-internal error, or silent steps, before
        (
            "fp32",
            lambda m: m.to(torch.bfloat16),
            r"is bfloat16 on cpu.*built its state for float32",
        ),
        # mixed bf16 and model.half(): it silently trained in fp16 before
        ("bf16", lambda m: m.half(), r"is float16 on cpu.*fp32 master weights.*for bfloat16"),
    ],
    ids=["fp32-to-bf16", "bf16-half"],
)
def test_a_model_cast_after_building_is_refused_at_the_next_step(
    batches, precision, change, message
):
    model, opt = _driven(precision)
    train_steps(model, opt, batches[:2])
    change(model)
    lm_loss(model, batches[2]).backward()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=message + r".*build the optimizer after changing"):
        opt.step()
    # Nothing changed: undoing the cast lets the same step go on.
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    model.to(torch.bfloat16 if precision == "bf16" else torch.float32)
    opt.step()
    assert opt.steps == 3


def test_a_model_moved_to_another_device_is_refused():
    # model.cuda() as a CPU can test it: torch's parameter swap keeps each parameter object (what
    # .data assignment does from CPU to CUDA) while its device changes, here to "meta".
    model, opt = _driven()
    lm_loss(model, torch.randint(0, 32, (2, 8))).backward()
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        weight = model.embed.weight
        model.to("meta")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert model.embed.weight is weight
    with pytest.raises(RuntimeError, match=r"'embed.weight' is float32 on meta.*float32 on cpu"):
        opt.step()


def test_parameters_replaced_in_the_model_are_refused():
    # load_state_dict(assign=True) puts new tensors in: stepping the old ones trains nothing.
    model, opt = _driven()
    model.load_state_dict(TinyLM().state_dict(), assign=True)
    lm_loss(model, torch.randint(0, 32, (2, 8))).backward()
    with pytest.raises(RuntimeError, match=r"'embed.weight' was replaced by another tensor"):
        opt.step()
