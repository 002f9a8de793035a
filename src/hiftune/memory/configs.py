"""Model architectures by name, for the memory tools: presets, or a Hugging Face ``config.json``.

The memory tools never need weights: ``estimate`` builds the model on the ``meta`` device and
``profile`` with random weights. A preset is a ``transformers`` config written down as data. A
model is built with one of the :data:`HEADS` (a ``transformers`` auto class); :mod:`.batches`
gives the dummy batch its loss takes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..errors import UserError, first_line

#: Preset name -> ``transformers.AutoConfig.for_model`` arguments (public architecture facts).
CONFIGS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    "llama-2-13b": dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    # The three below: the published config.json of meta-llama/Llama-3.1-8B, Qwen/Qwen2.5-7B and
    # google/gemma-2-2b on the Hugging Face Hub (the fields that set parameter shapes, plus those a
    # model needs to build).
    "llama-3.1-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        tie_word_embeddings=False,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=131072,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
    "gemma-2-2b": dict(
        model_type="gemma2",
        vocab_size=256000,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        max_position_embeddings=8192,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "roberta-base": dict(
        model_type="roberta",
        vocab_size=50265,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=1,
    ),
    "gpt2": dict(
        model_type="gpt2",
        vocab_size=50257,
        n_embd=768,
        n_layer=12,
        n_head=12,
        n_positions=1024,
    ),
}

#: What the loss of a head compares its output with (see :func:`.batches.dummy_batches`): ``tokens``, the
#: token ids themselves (a language model, also one decoding from an encoder); ``class``, one class
#: id per example; ``transcript``, a few token ids per example, shorter than the input (CTC).
LABELS = ("tokens", "class", "transcript")


@dataclass(frozen=True)
class Head:
    """How to build one kind of model and what its loss takes.

    Attributes:
        auto_class: The ``transformers`` auto class that builds it from a config.
        labels: One of :data:`LABELS`.
    """

    auto_class: str
    labels: str

    def __post_init__(self) -> None:
        if self.labels not in LABELS:
            raise ValueError(f"labels must be one of {', '.join(LABELS)}; got {self.labels!r}")


#: Head name -> how it is built and what its labels are.
HEADS: Mapping[str, Head] = MappingProxyType(
    {
        "causal-lm": Head("AutoModelForCausalLM", "tokens"),
        "seq-cls": Head("AutoModelForSequenceClassification", "class"),
        "seq2seq-lm": Head("AutoModelForSeq2SeqLM", "tokens"),
        "speech-seq2seq": Head("AutoModelForSpeechSeq2Seq", "tokens"),
        "image-cls": Head("AutoModelForImageClassification", "class"),
        "ctc": Head("AutoModelForCTC", "transcript"),
        "image-text-to-text": Head("AutoModelForImageTextToText", "tokens"),
    }
)

#: Task name -> head. The head names themselves, and ``hiftune train``'s task names, so that one
#: name means one model everywhere: ``prompt-cls`` (a label word after a prompt) and ``sft``
#: (prompt/response pairs) train a causal LM with its LM head; every other name is a head of
#: :data:`HEADS`.
TASK_HEADS: Mapping[str, str] = MappingProxyType(
    {
        "causal-lm": "causal-lm",
        "prompt-cls": "causal-lm",
        "sft": "causal-lm",
        **{h: h for h in HEADS},
    }
)


def head_of(task: str) -> str:
    """The head (one of :data:`HEADS`) that ``task`` trains.

    Raises:
        UserError: If ``task`` is not a key of :data:`TASK_HEADS`.
    """
    if task not in TASK_HEADS:
        raise UserError(f"task must be one of {', '.join(TASK_HEADS)}; got {task!r}")
    return TASK_HEADS[task]


def resolve_config(model: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """A ``transformers`` config from a preset, a ``config.json`` file or directory, or a Hub id.

    A Hub id's ``config.json`` is read as ``hiftune train`` reads it (``AutoConfig`` with the same
    revision and remote-code choice): from the cache under ``HF_HOME``, downloaded unless
    ``HF_HUB_OFFLINE=1``. No weights are read.

    Args:
        model: A preset of :data:`CONFIGS`, a path, or a Hugging Face Hub id (``org/name``).
        revision: The Hub revision (branch, tag or commit; Hub ids only).
        trust_remote_code: Let a Hub model's own configuration code run.

    Raises:
        UserError: If ``model`` is neither a preset, a readable config file or directory, nor a
            Hub id whose config can be read (unknown, or not cached and no network).
    """
    from transformers import AutoConfig

    if model in CONFIGS:
        kwargs = dict(CONFIGS[model])
        return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    what = (
        f"{model!r} is neither a preset ({', '.join(CONFIGS)}) nor a config.json file or a "
        "directory holding one"
    )
    if path.is_file():
        try:
            return AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot read a Hugging Face config from {path}: {e}") from None
    if path.exists() or not _is_hub_id(model):
        raise UserError(what)
    try:
        return AutoConfig.from_pretrained(
            model, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as e:  # unknown, not cached and offline, bad revision
        raise UserError(f"{what}; tried the Hugging Face Hub: {first_line(e)}") from None


def _is_hub_id(model: str) -> bool:
    """Whether ``model`` has the form of a Hub repository id (``name`` or ``org/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def new_head_parameters(model: nn.Module, task: str) -> list[str]:
    """The parameters a pretrained checkpoint of ``model``'s architecture would not hold.

    A classification head (``seq-cls``, ``image-cls``: what the base model computes is mapped to
    classes by parameters outside it) is initialised afresh when a language or vision checkpoint
    is fine-tuned; the other heads come with the checkpoint. This is what ``hiftune train``'s
    ``--always-active auto`` finds as the loader's missing keys, for a model built from a config.

    Args:
        model: A ``transformers`` model, e.g. from :func:`build_model`.
        task: A key of :data:`TASK_HEADS`.
    """
    if HEADS[head_of(task)].labels != "class":
        return []
    base = getattr(model, str(getattr(model, "base_model_prefix", "")), None)
    if not isinstance(base, nn.Module) or base is model:
        return []
    inside = {id(p) for p in base.parameters()}
    return [n for n, p in model.named_parameters() if id(p) not in inside]


def build_model(
    config: Any,
    task: str = "causal-lm",
    num_labels: int = 2,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Builds a randomly initialised model for ``task`` on ``device`` (``"meta"``: no memory).

    Args:
        config: A ``transformers`` config (e.g. from :func:`resolve_config`).
        task: A key of :data:`TASK_HEADS`: a head name or one of ``hiftune train``'s tasks.
        num_labels: Classes of a ``class`` head (``seq-cls``, ``image-cls``).
        device: Where to build; ``"meta"`` gives shapes without storage.
        dtype: The parameters' dtype.

    Raises:
        UserError: For an unknown task, or an architecture that has no model class for its head.
    """
    import transformers

    head = head_of(task)
    auto = getattr(transformers, HEADS[head].auto_class)
    if HEADS[head].labels == "class":
        config.num_labels = num_labels
    try:
        with torch.device(device):
            model = auto.from_config(config, dtype=dtype)
    except ValueError as e:
        what = task if task == head else f"{task} (a {head} head)"
        has = [h for h in HEADS if _has_head(config, h)]
        if has:  # transformers' own message lists every model type the auto class knows
            raise UserError(
                f"a {config.model_type} model cannot do {what}: {HEADS[head].auto_class} has no "
                f"class for it; its heads: {', '.join(has)}"
            ) from None
        raise UserError(f"a {config.model_type} model cannot do {what}: {first_line(e)}") from None
    # A tensor made by the legacy ``torch.Tensor(n)`` constructor ignores the device context
    # (wav2vec2's ``masked_spec_embed``).
    return model.to(device)


def _has_head(config: Any, head: str) -> bool:
    """Whether ``transformers`` has a model class for ``config`` with ``head``."""
    import transformers

    mapping = getattr(getattr(transformers, HEADS[head].auto_class), "_model_mapping", None)
    try:
        return type(config) in mapping  # type: ignore[operator]
    except TypeError:  # no mapping (another transformers version): no suggestion
        return False
