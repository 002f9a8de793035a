"""Dummy inputs for the tracer: each input a model takes, sized from its config."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hiftune.engine.split.dummy import dummy_calls
from tinymodels import TinyLM

META = torch.device("meta")


class _Recorder(nn.Module):
    """Records the keyword inputs of its calls; fails while ``fail_with`` names one of them."""

    def __init__(self, config: SimpleNamespace, fail_with: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(2))
        self.fail_with = fail_with
        self.calls: list[dict[str, torch.Tensor]] = []

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        input_features=None,
        input_values=None,
        decoder_input_ids=None,
        use_cache=None,
    ):
        given = {k: v for k, v in locals().items() if torch.is_tensor(v)}
        self.calls.append(given)
        if self.fail_with in given:
            raise ValueError(f"cannot take {self.fail_with}")


def _shapes(model: _Recorder) -> list[dict[str, tuple[int, ...]]]:
    for call in dummy_calls(model, META):
        with contextlib.suppress(ValueError):  # the recorder refuses an input: the next call
            call()
    return [{k: tuple(v.shape) for k, v in c.items()} for c in model.calls]


def test_every_input_the_config_sizes_then_text_only():
    vision = SimpleNamespace(model_type="clip", image_size=32, num_channels=3)
    model = _Recorder(SimpleNamespace(vocab_size=50, vision_config=vision), "pixel_values")
    full, text = _shapes(model)
    assert full["pixel_values"] == (1, 3, 32, 32)  # read from the sub-config
    assert full["input_ids"] == full["attention_mask"] == full["decoder_input_ids"] == (1, 8)
    assert "pixel_values" not in text and text["input_ids"] == (1, 8)


def test_spectrograms():
    # Whisper's encoder takes exactly two frames per position.
    whisper = _Recorder(SimpleNamespace(num_mel_bins=80, max_source_positions=1500))
    assert [s["input_features"] for s in _shapes(whisper)] == [(1, 80, 3000)]
    # Speech2Text: frames x (features per channel x channels).
    s2t = _Recorder(SimpleNamespace(input_feat_per_channel=40, input_channels=2))
    assert [s["input_features"] for s in _shapes(s2t)] == [(1, 32, 80)]


def test_waveform_long_enough_for_the_feature_encoder():
    # wav2vec2-base's 7 convolutions: 8 output frames need 2,800 samples.
    kernels, strides = (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)
    model = _Recorder(SimpleNamespace(conv_kernel=kernels, conv_stride=strides))
    (shape,) = [s["input_values"] for s in _shapes(model)]
    frames = shape[1]
    for k, s in zip(kernels, strides, strict=True):
        frames = (frames - k) // s + 1
    assert frames == 8


class _Pixels(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.config = config

    def forward(self, pixel_values):
        return pixel_values


def test_nothing_to_size_means_no_call():
    assert dummy_calls(_Pixels(SimpleNamespace(num_channels=3)), META) == []  # no image size
    (call,) = dummy_calls(_Pixels(SimpleNamespace(image_size=[4, 6])), META)
    assert call().shape == (1, 3, 4, 6)


def test_plain_module_gets_token_ids_positionally():
    (call,) = dummy_calls(TinyLM(vocab=32), torch.device("cpu"))
    assert call().shape == (1, 8, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_in_the_models_float_dtype(dtype):
    model = _Recorder(SimpleNamespace(image_size=8)).to(dtype)
    (call,) = dummy_calls(model, META)
    call()
    assert model.calls[0]["pixel_values"].dtype == dtype
