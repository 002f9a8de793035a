"""The gradient check of every model head against a real backward pass on the same model."""

from __future__ import annotations

import copy

import pytest
import torch

from hiftune import HiFTConfig, split_units
from hiftune.memory.batches import dummy_batches
from hiftune.memory.configs import build_model
from hiftune.memory.gradient_check import FULL, check_gradients, dummy_loss
from tinymodels import HEAD_KINDS, tiny_head_config

T = pytest.importorskip("transformers")


#: Head -> the tiny model of tests/tinymodels.py whose config it is built from.
def reference_batch(head: str) -> dict[str, torch.Tensor]:
    """A batch of one example written out by hand, with the labels the head's loss takes."""
    ids = torch.arange(1, 9).unsqueeze(0)
    if head == "seq2seq-lm":
        return {"input_ids": ids, "labels": ids}
    if head == "speech-seq2seq":  # 16 mel bins, 2 x 16 encoder positions
        return {"input_features": torch.randn(1, 16, 32), "labels": ids}
    if head == "image-cls":
        return {"pixel_values": torch.randn(1, 3, 32, 32), "labels": torch.tensor([1])}
    if head == "ctc":
        return {"input_values": torch.randn(1, 400), "labels": torch.tensor([[3, 4, 5]])}
    # LLaVA: (32 / 8)^2 = 16 patch features, one image token (id 95) each, then the text.
    image = torch.full((1, 16), 95)
    labels = torch.cat([torch.full((1, 16), -100), ids], dim=1)
    return {
        "input_ids": torch.cat([image, ids], dim=1),
        "pixel_values": torch.randn(1, 3, 32, 32),
        "labels": labels,
    }


HEADS = ["seq2seq-lm", *HEAD_KINDS]


@pytest.mark.parametrize("head", HEADS)
def test_the_check_finds_what_a_real_backward_leaves_without_gradient(head):
    config = tiny_head_config(head)
    torch.manual_seed(0)
    real = build_model(copy.deepcopy(config), head).eval()
    real(**reference_batch(head)).loss.backward()
    expected = [n for n, p in real.named_parameters() if p.requires_grad and p.grad is None]

    model = build_model(config, head, device="meta")
    units = split_units(model, HiFTConfig(max_unit_params=None))
    _, no_gradient = check_gradients(model, units, [(u,) for u in units], head)
    # Nothing is cut off by HiFT's truncation; what no backward reaches is the real one's.
    assert no_gradient == ({FULL: expected} if expected else {})


def test_llavas_unused_vision_norm_is_a_real_finding():
    # LLaVA feeds the projector the last hidden state, before the vision tower's final norm.
    real = build_model(tiny_head_config("image-text-to-text"), "image-text-to-text").eval()
    real(**reference_batch("image-text-to-text")).loss.backward()
    unused = [n for n, p in real.named_parameters() if p.grad is None]
    assert unused == [
        "model.vision_tower.post_layernorm.weight",
        "model.vision_tower.post_layernorm.bias",
    ]


@pytest.mark.parametrize("head", HEADS)
def test_the_dummy_loss_is_the_models_own_loss_on_a_real_model(head):
    torch.manual_seed(0)
    model = build_model(tiny_head_config(head), head).eval()
    batch = dummy_batches(model, head)[0]
    assert "labels" in batch
    loss = dummy_loss(model, head)
    assert loss.ndim == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss, model(**batch).loss)  # not the fallback sum of outputs


def test_a_model_without_a_loss_on_meta_falls_back_to_its_outputs():
    # Wav2Vec2ForCTC reads its labels' values (the largest id against the vocabulary), which a
    # meta tensor cannot answer: the check runs the batch without labels instead.
    model = build_model(tiny_head_config("ctc"), "ctc", device="meta")
    loss = dummy_loss(model, "ctc")
    assert loss.is_meta and type(loss.grad_fn).__name__ == "SumBackward0"
