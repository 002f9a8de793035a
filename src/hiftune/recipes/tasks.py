"""The recipe's tasks: how examples become tensors, and what loss and metrics the Trainer uses.

A :class:`Task` is what ``transformers.Trainer`` is parametrised with for one ``--task``: the
encoding of records into token ids, the collator, and optionally a loss, a logits reduction and
metrics. :func:`build_task` picks and builds the one a configuration asks for.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from . import chat
from . import data as D
from .config import TrainRecipeConfig

#: A data collator: a list of encoded examples -> one padded batch of tensors.
Collator = Callable[[Sequence[Mapping[str, Any]]], Mapping[str, Any]]


class Task:
    """Per-task encoding, collation, loss and metrics (what the Trainer is parametrised with).

    ``None`` for :attr:`compute_loss` or :attr:`preprocess_logits` keeps the Trainer's default
    (the model's own loss; the full logits).

    Args:
        tokenizer: The model's tokenizer, with a pad token.
        max_length: Tokens per example at most.
    """

    compute_loss: Callable[..., Any] | None = None
    preprocess_logits: Callable[[Any, Any], Any] | None = None

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def encode(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Tokenizes records into model inputs with ``labels``."""
        raise NotImplementedError

    def encode_eval(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """:meth:`encode`, sorted by length: the order does not change the metrics, and sorted
        batches need the least padding."""
        return sorted(self.encode(records), key=lambda f: len(f["input_ids"]))

    def collator(self) -> Collator:
        """Right padding: the default for models that read the first token or mask the padding."""
        return D.PadCollator(self.tokenizer.pad_token_id, "right")

    def compute_metrics(self, pred: Any) -> dict[str, float]:
        """Accuracy of class predictions (``predictions`` are per-class scores)."""
        scores = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        labels = pred.label_ids
        return {"accuracy": float((np.asarray(scores).argmax(-1) == np.asarray(labels)).mean())}


class PromptClsTask(Task):
    """Prompt-based classification: train and score the label words' tokens after the prompt.

    Args:
        model: The causal language model (its ``forward`` signature decides the collation).
        tokenizer: Its tokenizer.
        fmt: The prompt template and label words.
        max_length: Tokens per example at most.
    """

    def __init__(self, model: Any, tokenizer: Any, fmt: D.PromptFormat, max_length: int) -> None:
        super().__init__(tokenizer, max_length)
        self.fmt = fmt
        self.word_ids = torch.tensor(fmt.label_token_ids(tokenizer))
        params = inspect.signature(model.forward).parameters
        self.position_ids = "position_ids" in params
        # Only the last position's logits are needed: skip the LM head everywhere else.
        self.keep_last = "logits_to_keep" in params

    def encode(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return D.encode_prompt_cls(records, self.tokenizer, self.fmt, self.max_length)

    def collator(self) -> Collator:
        collate = D.PadCollator(self.tokenizer.pad_token_id, "left", self.position_ids)
        if not self.keep_last:
            return collate

        def with_keep(features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
            batch: dict[str, Any] = collate(features)
            batch["logits_to_keep"] = 1
            return batch

        return with_keep

    def compute_loss(self, outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
        """Cross-entropy over the label words' scores at the last position of the prompt.

        The scores are the next-token logits of the label words' tokens, so training pushes up
        the right word against the other label words only (the "train as classification" loss of
        LM-BFF and MeZO, the setup of the HiFT paper's prompt experiments).
        """
        logits = outputs["logits"][:, -1, :].float()[:, self.word_ids.to(labels.device)]
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        n = num_items_in_batch if num_items_in_batch is not None else labels.numel()
        return loss / n

    def preprocess_logits(self, logits: Any, labels: Any) -> Any:
        """Keeps only the label words' log-likelihoods after the prompt: ``[batch, classes]``."""
        if isinstance(logits, tuple):
            logits = logits[0]
        logp = logits[:, -1, :].float().log_softmax(-1)
        return logp[:, self.word_ids.to(logp.device)]


class SeqClsTask(Task):
    """Sequence classification with the model's classification head (labels are class ids)."""

    def encode(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return D.encode_seq_cls(records, self.tokenizer, self.max_length)


class SftTask(Task):
    """Supervised fine-tuning on chat messages, prompt/completion pairs or plain text.

    The records are rows of :func:`hiftune.recipes.chat.normalize_rows`; the loss is the model's
    own next-token loss over the tokens :func:`hiftune.recipes.chat.encode_sft` labels (the
    assistant turns, the completion, or all of a text).
    """

    def encode(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return chat.encode_sft(records, self.tokenizer, self.max_length)

    compute_metrics = None  # type: ignore[assignment]  # eval loss only


def build_task(
    cfg: TrainRecipeConfig, model: Any, tokenizer: Any, classes: list[str] | None
) -> Task:
    """The :class:`Task` for ``cfg.task``.

    Args:
        cfg: The configuration (task, template, label words, maximum length).
        model: The loaded model.
        tokenizer: Its tokenizer.
        classes: The data's class names in label order (``None`` for ``sft``).

    Raises:
        DataError: If the label words do not fit the classes (one word per class).
    """
    if cfg.task == "prompt-cls":
        words = cfg.label_words
        if words is None:
            if len(classes or []) != len(D.DEFAULT_LABEL_WORDS):
                raise D.DataError(
                    f"the data has {len(classes or [])} classes {classes}; give one "
                    "--label-words word per class"
                )
            words = list(D.DEFAULT_LABEL_WORDS)
        if len(words) != len(classes or []):
            raise D.DataError(
                f"{len(words)} label words {words} for {len(classes or [])} classes {classes}"
            )
        fmt = D.PromptFormat(cfg.template, tuple(words))
        return PromptClsTask(model, tokenizer, fmt, cfg.max_length)
    if cfg.task == "seq-cls":
        return SeqClsTask(tokenizer, cfg.max_length)
    return SftTask(tokenizer, cfg.max_length)


class ListDataset:
    """A map-style dataset over a list of tokenized examples."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]
