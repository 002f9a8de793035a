"""The run's examples: which rows of which splits, with which fields, for the configured task.

:func:`load_examples` turns a :class:`~hiftune.recipes.config.TrainRecipeConfig` into the records
the task encodes: the bundled sentiment data (its fixed splits, and the demo's default subsets of
1,600 training and 500 evaluation sentences), or the user's data read by :mod:`.sources` (used
whole unless ``train_samples`` / ``eval_samples`` say otherwise), with the fields of the task:
``text``/``label`` for classification (labels become class ids over every split used), the
``sft`` formats of :mod:`.chat` otherwise (with ``--system-prompt`` in every conversation). It
also says, in one line, what was used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import chat
from . import data as D
from .config import ALL, EVAL_SPLITS, TrainRecipeConfig
from .sources import choose_splits, describe_splits, load_data

Records = list[dict[str, Any]]


@dataclass
class Examples:
    """What :func:`load_examples` returns.

    Attributes:
        splits: ``train``, ``eval`` (and ``also`` with ``also_eval``) -> records: ``text`` and
            class-id ``label`` for classification, :func:`.chat.normalize_rows` rows for ``sft``.
        classes: The class names in label order (``None`` for ``sft``).
        description: Which examples of which splits were used, in one line (for the report).
        eval_split: The name of the split evaluated on.
    """

    splits: dict[str, Records]
    classes: list[str] | None
    description: str
    eval_split: str


def load_examples(cfg: TrainRecipeConfig, verbose: bool = False) -> Examples:
    """The training and evaluation examples ``cfg`` asks for.

    Args:
        cfg: The run's configuration (data, splits, sample counts, task and field names).
        verbose: Keep ``datasets``' own logging and progress bars while reading.

    Raises:
        DataError: If the data cannot be read, lacks a split or a field the task needs (naming
            the fields it has), has a bad row, or leaves no training or evaluation example.
    """
    if cfg.data is None:
        return _bundled(cfg)
    loaded = load_data(cfg.data, cfg.data_config, verbose=verbose)
    chosen = choose_splits(
        loaded.splits,
        train_split=cfg.data_split,
        eval_split=cfg.eval_split,
        also_eval=cfg.also_eval,
        eval_fraction=cfg.eval_fraction,
    )
    fmt = None
    sft_fields = {
        "messages": cfg.messages_field,
        "prompt": cfg.prompt_field,
        "completion": cfg.completion_field,
        "response": cfg.response_field,
        "text": cfg.text_field,
    }
    if cfg.task == "sft":  # the training split's fields decide the format
        fmt, fields = chat.detect_format(chosen.train.column_names, sft_fields)
    else:
        fields = {"text": cfg.text_field, "label": cfg.label_field}
    sets = {"train": chosen.train, "eval": chosen.eval}
    if chosen.also is not None:
        sets["also"] = chosen.also
    total = {k: len(v) for k, v in sets.items()}
    # A user's data is used whole unless a number of samples is given.
    n_train, n_eval = _samples(cfg.train_samples, None), _samples(cfg.eval_samples, None)
    out: dict[str, Records] = {}
    for role, ds in sets.items():
        where = f"{loaded.source} ({chosen.notes[role]})"
        # (Alpaca's input is optional in every split.)
        missing = [f for k, f in fields.items() if f not in ds.column_names and k != "input"]
        if missing:
            option = next(k for k, v in fields.items() if v == missing[0])
            if option == "completion" and missing[0] != cfg.completion_field:
                option = "response"  # the pair's answer came from --response-field
            # ShareGPT's and Alpaca's fields have fixed names, no option.
            flag = "" if fmt in ("sharegpt", "alpaca") else f" (--{option}-field)"
            hint = D.sft_hint(ds.column_names, sft_fields) if fmt is None else ""
            raise D.DataError(
                f"field {missing[0]!r}{flag} is not in {where}; "
                f"its fields are: {', '.join(ds.column_names)}{hint}"
            )
        if role == "train":
            ds = ds.select(D.sample_indices(len(ds), n_train, cfg.seed))
        elif n_eval is not None:
            ds = ds.select(range(min(len(ds), n_eval)))
        if fmt is not None:  # with the other formats' fields, to name a row of another format
            rows = ds.select_columns(chat.format_columns(ds.column_names, sft_fields)).to_list()
            out[role] = chat.normalize_rows(rows, fmt, where, fields)
        else:
            rows = ds.select_columns(list(dict.fromkeys(fields.values()))).to_list()
            out[role] = D.select_fields(rows, fields, where)
    classes: list[str] | None = None
    if cfg.task != "sft":  # one class list over every split, so that the ids agree
        _, classes = D.encode_labels([r for rows in out.values() for r in rows])
        out = {k: D.encode_labels(v, classes)[0] for k, v in out.items()}
    if not out["train"] or not out["eval"]:
        raise D.DataError("the data leaves no training or evaluation examples")
    used = {k: len(v) for k, v in out.items()}
    out = _with_prompt_options(cfg, out)
    return Examples(out, classes, describe_splits(chosen.notes, used, total), chosen.names["eval"])


def _bundled(cfg: TrainRecipeConfig) -> Examples:
    """The bundled sentiment task: its fixed splits and the demo's default subsets."""
    classes: list[str] | None = None
    splits = D.sentiment_splits()
    if cfg.task == "sft":
        splits = {k: D.as_sft(v) for k, v in splits.items()}
    else:
        classes = ["negative", "positive"]
    eval_split = cfg.eval_split or "test"
    for name in (eval_split, cfg.also_eval):
        if name is not None and name not in EVAL_SPLITS:
            raise D.DataError(
                f"the bundled data has no evaluation split {name!r}; use {' or '.join(EVAL_SPLITS)}"
            )
    n_train = _samples(cfg.train_samples, D.DEMO_TRAIN_SAMPLES)
    n_eval = _samples(cfg.eval_samples, D.DEMO_EVAL_SAMPLES)
    roles = {"eval": eval_split, **({"also": cfg.also_eval} if cfg.also_eval else {})}
    out = {"train": D.subsample(splits["train"], n_train, cfg.seed)}
    out.update({role: splits[name][:n_eval] for role, name in roles.items()})
    notes = {"train": "'train' split", **{role: f"{name!r} split" for role, name in roles.items()}}
    total = {"train": len(splits["train"]), **{r: len(splits[n]) for r, n in roles.items()}}
    used = {k: len(v) for k, v in out.items()}
    line = "bundled sentiment data: " + describe_splits(notes, used, total)
    return Examples(_with_prompt_options(cfg, out), classes, line, eval_split)


def _with_prompt_options(cfg: TrainRecipeConfig, splits: dict[str, Records]) -> dict[str, Records]:
    """``sft`` rows with ``--system-prompt`` in every conversation; ``--chat-template`` read
    (the tokenizer takes it later, but a missing file is refused before the slow part)."""
    if cfg.chat_template is not None:
        chat.chat_template_text(cfg.chat_template)
    if cfg.system_prompt is None:
        return splits
    return {k: chat.with_system_prompt(v, cfg.system_prompt) for k, v in splits.items()}


def _samples(value: int | str | None, default: int | None) -> int | None:
    """``train_samples`` / ``eval_samples`` as a count (``None``: all of them)."""
    if value == ALL:
        return None
    return default if value is None else int(value)
