"""Dummy batches for the memory tools' one-pass checks: the inputs and labels a head's loss takes.

The gradient check (:mod:`.gradient_check`) and the activation estimate (:mod:`.estimate`) run a
model once on a dummy batch. Its inputs other than token ids come from the engine's tracer
(:func:`hiftune.engine.split.dummy.dummy_inputs`: pixels, spectrograms, waveforms sized by the config);
its labels follow the head (:data:`.configs.HEADS`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..engine.split.dummy import SEQ_LEN, dummy_inputs
from .configs import HEADS

#: Token-id inputs of a dummy batch, where the forward takes them.
_TOKEN_INPUTS = ("input_ids", "decoder_input_ids")
#: Inputs whose last axis is audio samples (its length is the dummy batch's ``seq_len``).
_WAVEFORMS = ("input_values",)
#: Config fields naming the token that stands for an image feature in a vision-language model.
_IMAGE_TOKEN_FIELDS = ("image_token_id", "image_token_index")
#: Label ids per example of a ``transcript`` head.
TRANSCRIPT = 2


def dummy_batches(
    model: nn.Module, head: str, batch_size: int = 1, seq_len: int | None = None
) -> list[dict[str, Any]]:
    """Keyword batches of ``batch_size`` dummy examples for a ``head`` model, to try in order.

    The inputs other than token ids (pixels, a spectrogram, a waveform) are those of
    :func:`hiftune.engine.split.dummy.dummy_inputs`, sized by the config and repeated over the batch; a
    waveform is ``seq_len`` samples long if given. Token ids are ``seq_len`` (default
    :data:`~hiftune.engine.split.dummy.SEQ_LEN`) zeros ending in the end-of-sequence id (T5 and BART
    classification heads pool there), given as ``input_ids`` and ``decoder_input_ids`` where the
    forward takes them. With pixels and a config naming an image token (a vision-language model),
    the sequence starts with one image token per image feature (as many as the model makes of the
    image, at least ``seq_len`` tokens in all), and those positions are no labels (-100).

    Args:
        model: A model built for ``head`` (any device, ``meta`` included).
        head: A key of :data:`HEADS`: which labels to add (:data:`LABELS`).
        batch_size: Examples in the batch.
        seq_len: Token ids per example (and samples of a waveform).

    Returns:
        The batch with labels, then the same without labels (for a model that cannot compute its
        loss on it, e.g. on the ``meta`` device; its caller then sums the first output).
    """
    config = getattr(model, "config", None)
    device = next(model.parameters()).device
    offered = (dummy_inputs(model, device) or [{}])[0]  # the full call (all modalities) first
    batch: dict[str, Any] = {}
    for name, value in offered.items():
        if torch.is_tensor(value) and value.is_floating_point():
            if name in _WAVEFORMS and seq_len is not None:
                value = value.new_zeros(*value.shape[:-1], seq_len)
            batch[name] = value.expand(batch_size, *value.shape[1:])
    images = _image_tokens(model, batch)
    length = seq_len or SEQ_LEN
    if images is not None:
        length = max(length, images[1] + 1)
    ids = torch.zeros(batch_size, length, dtype=torch.long, device=device)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int) and 0 <= eos < getattr(config, "vocab_size", 0):
        ids[:, -1] = eos  # e.g. T5/BART classification heads pool at the end-of-sequence token
    if images is not None:
        ids[:, : images[1]] = images[0]
    for name in _TOKEN_INPUTS:
        if name in offered or (name == "input_ids" and not offered):
            batch[name] = ids
    kind = HEADS[head].labels
    if kind == "class":
        labels = torch.zeros(batch_size, dtype=torch.long, device=device)
    elif kind == "transcript":
        vocab = getattr(config, "vocab_size", None)
        # Ids 1.. (0 is often the CTC blank), fewer than the input frames.
        transcript = torch.arange(1, TRANSCRIPT + 1, device=device)
        labels = (transcript % vocab if isinstance(vocab, int) else transcript).repeat(
            batch_size, 1
        )
    else:
        labels = ids.clone()
        if images is not None:
            labels[:, : images[1]] = -100  # the image's positions are inputs, not text to predict
    return [{**batch, "labels": labels}, batch]


def _image_tokens(model: nn.Module, batch: dict[str, Any]) -> tuple[int, int] | None:
    """``(image token id, tokens per image)`` of a model taking an image among its text tokens.

    The count is what the model makes of one dummy image (``get_image_features``, on any device):
    it checks that the text holds exactly one image token per image feature.
    """
    config = getattr(model, "config", None)
    token = next(
        (t for f in _IMAGE_TOKEN_FIELDS if isinstance(t := getattr(config, f, None), int)), None
    )
    features_of = getattr(model, "get_image_features", None)
    pixels = batch.get("pixel_values")
    if token is None or pixels is None or not callable(features_of):
        return None
    try:
        with torch.no_grad():
            out = features_of(pixel_values=pixels[:1])
    except (TypeError, ValueError, RuntimeError):  # it needs more (image sizes): no image tokens
        return None
    features = getattr(out, "pooler_output", out)
    if torch.is_tensor(features):
        features = [features]
    if not isinstance(features, list | tuple) or not all(torch.is_tensor(f) for f in features):
        return None
    return token, sum(f.shape[:-1].numel() for f in features)


def first_that_runs(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    before_each: Callable[[], None] | None = None,
) -> Any:
    """The output of ``model`` on the first of ``batches`` it runs on (see :func:`dummy_batches`).

    Args:
        model: The model.
        batches: Keyword batches, in the order to try them.
        before_each: Called before each try (e.g. to forget what a failed try recorded).

    Raises:
        Exception: The first batch's error, if no batch runs.
    """
    error: Exception | None = None
    for batch in batches:
        if before_each is not None:
            before_each()
        try:
            return model(**batch)
        except Exception as e:  # the next batch may take less (no labels)
            error = error or e
    raise error or ValueError("no dummy batch to run")
