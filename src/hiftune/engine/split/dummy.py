"""A tiny input for any model, built from its forward signature and its config.

:mod:`.trace` runs a model once to see in which order its blocks and parameters run. Text models
take token ids; vision and audio towers take pixels, spectrograms or waveforms. Each input the
forward accepts is built from the config fields that size it (the data in :data:`_INPUTS`), read
from the model's config or any of its sub-configs (``vision_config``, ``audio_config``, ...):

=================== ============================================================================
``input_ids``       token ids ``1..L`` (not the usual padding id 0), ``L`` = 8 or the position
                    limit; with an all-ones ``attention_mask``; also as ``decoder_input_ids``
``pixel_values``    ``(1, num_channels, H, W)`` zeros, ``H, W`` = ``image_size``
``input_features``  a spectrogram: ``(1, num_mel_bins, 2 * max_source_positions)`` where the
                    encoder has a fixed length (Whisper and the models built on its encoder),
                    else ``(1, frames, feature size)`` (Speech2Text, Seamless)
``input_values``    a waveform ``(1, samples)`` long enough for the convolutional feature
                    encoder to give a few frames (``conv_kernel``, ``conv_stride``)
=================== ============================================================================

A model that takes token ids besides another modality (a vision-language model) is also offered
a text-only call, tried if the full one cannot run: its towers then go untraced and the split
falls back to registration order for them. Nothing here imports ``transformers``: configs are
read by attribute.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

#: Length of the dummy token sequence (shortened to the model's position limit if that is smaller).
SEQ_LEN = 8
#: Frames of a spectrogram or a waveform encoder's output, where the length is free.
FRAMES = 8


def dummy_calls(model: nn.Module, device: torch.device) -> list[Callable[[], Any]]:
    """Calls of ``model`` on tiny inputs, to try in order until one runs.

    Args:
        model: The model (any device, ``meta`` included).
        device: Where the inputs are built.

    Returns:
        A call per entry of :func:`dummy_inputs`; for a plain module (``forward(self, x)``) the
        call on token ids as its first argument; empty if nothing can be built.
    """
    inputs = dummy_inputs(model, device)
    if inputs is None:
        ids = _token_ids(model, getattr(model, "config", None), device)
        return [] if ids is None else [lambda: model(ids)]
    return [functools.partial(model, **kwargs) for kwargs in inputs]


def dummy_inputs(model: nn.Module, device: torch.device) -> list[dict[str, Any]] | None:
    """Keyword inputs of one tiny example for ``model``, to try in order until one runs.

    Args:
        model: The model (any device, ``meta`` included).
        device: Where the inputs are built.

    Returns:
        Every input the model's forward takes and the config can size (token ids, with an
        all-ones ``attention_mask`` and as ``decoder_input_ids`` if taken; ``pixel_values``,
        ``input_features``, ``input_values``), then, for a model that also takes token ids, the
        text-only inputs; empty if nothing can be sized. ``None`` if the forward takes none of
        these names (a plain module).
    """
    try:
        signature = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if not any(name in signature for name in ("input_ids", *_INPUTS)):
        return None
    config = getattr(model, "config", None)
    ids = _token_ids(model, config, device)
    text: dict[str, Any] = {}
    if ids is not None and "input_ids" in signature:
        text["input_ids"] = ids
        if "attention_mask" in signature:
            # An explicit all-ones mask spares the model from inspecting the ids (for padding or
            # packed sequences), which a meta tensor cannot answer.
            text["attention_mask"] = torch.ones_like(ids)
    if ids is not None and "decoder_input_ids" in signature:
        text["decoder_input_ids"] = ids
    if "use_cache" in signature:
        text["use_cache"] = False
    dtype = _float_dtype(model)
    other = {}
    for name, build in _INPUTS.items():
        if name in signature:
            value = build(config, dtype, device)
            if value is not None:
                other[name] = value
    inputs = []
    if other:
        inputs.append({**text, **other})
    if "input_ids" in text:
        inputs.append(text)
    return inputs


def _token_ids(model: nn.Module, config: Any, device: torch.device) -> torch.Tensor | None:
    vocab = _vocab_size(model)
    if vocab is None:
        return None
    length = SEQ_LEN
    for attr in ("max_position_embeddings", "n_positions"):
        limit = getattr(config, attr, None)
        if isinstance(limit, int) and 2 <= limit < length:
            length = limit
    return (torch.arange(1, length + 1) % vocab).unsqueeze(0).to(device)


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's token embedding, if it names one (``get_input_embeddings``), else ``None``."""
    get_inputs = getattr(model, "get_input_embeddings", None)
    if not callable(get_inputs):
        return None
    try:
        embedding = get_inputs()
    except (NotImplementedError, AttributeError):  # a model without token inputs (audio)
        return None
    return embedding if isinstance(embedding, nn.Module) else None


def _vocab_size(model: nn.Module) -> int | None:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int) and size > 1:
        return size
    embedding = input_embeddings(model)
    if not isinstance(embedding, nn.Embedding):
        embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return embedding.num_embeddings if isinstance(embedding, nn.Embedding) else None


def _float_dtype(model: nn.Module) -> torch.dtype:
    floats = (p.dtype for p in model.parameters() if p.is_floating_point())
    return next(floats, torch.get_default_dtype())


def _configs(config: Any) -> Iterator[Any]:
    """``config`` and then its sub-configs (attributes that are configs themselves), depth first."""
    if config is None:
        return
    yield config
    for value in vars(config).values() if hasattr(config, "__dict__") else ():
        if hasattr(value, "model_type") and hasattr(value, "__dict__"):
            yield from _configs(value)


def _find(config: Any, name: str) -> Any:
    """The first value of field ``name`` on ``config`` or a sub-config, else ``None``."""
    for c in _configs(config):
        value = getattr(c, name, None)
        if value is not None:
            return value
    return None


def _pixels(config: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    size = _find(config, "image_size")
    if isinstance(size, int):
        size = (size, size)
    if not (
        isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(s, int) for s in size)
    ):
        return None
    channels = _find(config, "num_channels")
    channels = channels if isinstance(channels, int) else 3
    return torch.zeros(1, channels, *size, dtype=dtype, device=device)


def _spectrogram(config: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    mel, positions = _find(config, "num_mel_bins"), _find(config, "max_source_positions")
    if isinstance(mel, int) and isinstance(positions, int):
        # Whisper-style encoders take a fixed length: two frames per position (a stride-2 conv).
        return torch.zeros(1, mel, 2 * positions, dtype=dtype, device=device)
    per_channel = _find(config, "input_feat_per_channel")
    if isinstance(per_channel, int):  # Speech2Text: (batch, frames, features x channels)
        channels = _find(config, "input_channels")
        width = per_channel * (channels if isinstance(channels, int) else 1)
    else:  # Seamless, Granite Speech: (batch, frames, features)
        widths = [_find(config, n) for n in ("feature_size", "input_dim")]
        found = [w for w in widths if isinstance(w, int)]
        if not found:
            return None
        width = found[0]
    return torch.zeros(1, 4 * FRAMES, width, dtype=dtype, device=device)


def _waveform(config: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    kernels, strides = _find(config, "conv_kernel"), _find(config, "conv_stride")
    if not (isinstance(kernels, list | tuple) and isinstance(strides, list | tuple)):
        return torch.zeros(1, 16_000, dtype=dtype, device=device)  # a second at 16 kHz
    # Walk the convolutions backwards from FRAMES outputs: n_in = (n_out - 1) * stride + kernel.
    samples = FRAMES
    for kernel, stride in reversed(list(zip(kernels, strides, strict=False))):
        samples = (samples - 1) * stride + kernel
    return torch.zeros(1, max(samples, math.prod(strides)), dtype=dtype, device=device)


#: Input name -> how to build it from the config (``None``: the config does not say).
_INPUTS: dict[str, Callable[[Any, torch.dtype, torch.device], torch.Tensor | None]] = {
    "pixel_values": _pixels,
    "input_features": _spectrogram,
    "input_values": _waveform,
}
