"""Supervised fine-tuning rows: chat ``messages``, ShareGPT, Alpaca, prompt/completion, ``text``.

``--task sft`` takes the row formats of the ecosystem; :func:`detect_format` picks one from the
fields the data has, in this order:

* ``messages``: a list of ``{"role", "content"}`` turns (TRL's conversational format); the loss
  is on the assistant turns (their content and the template's end-of-turn text);
* ``sharegpt``: ``conversations``, a list of ``{"from", "value"}`` turns whose speakers are
  ``human``, ``gpt`` and ``system`` (a ``messages`` field in that style is read the same way);
* ``alpaca``: ``instruction`` with an optional ``input`` and the ``output`` to learn: a
  prompt/completion pair whose prompt is the instruction, then a blank line and the input;
* ``prompt-completion``: ``prompt`` with ``completion`` (or the older ``response``); the loss is
  on the completion;
* ``text``: plain text; the loss is on every token (language modelling).

One dataset holds one format: a row without the fields of the format its fields decided (a file
mixing formats) is refused, naming the row and what it has.

Conversations are rendered with the tokenizer's chat template, or the one ``--chat-template``
gives (:func:`set_chat_template`); a tokenizer without one cannot take conversations.
``--system-prompt`` makes every conversation start with that system message
(:func:`with_system_prompt`). A prompt/completion pair is a user turn and an assistant turn in
the chat template when the tokenizer has one; without one (a base model), the completion's text
and the end-of-sequence token follow the prompt's text directly. A prompt may also be a list of
messages (and the completion a list or a string): then only the completion's assistant turns are
learned. Plain ``text`` gets the end-of-sequence token appended.

Which tokens belong to the assistant: a template that marks them (``{% generation %}``) answers
through ``return_assistant_tokens_mask``. Otherwise the conversation is rendered incrementally:
an assistant turn's text is what rendering the turns up to it adds to rendering the turns before
it with the generation prompt; the tokens of the whole rendering whose characters fall in those
stretches are the assistant's. (A template that rewrites earlier turns once more follow falls back
to the common prefix of the renderings, so template text never counts as the assistant's.)
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import first_line
from .sources import DataError

logger = logging.getLogger(__name__)

#: The roles a conversation may use.
ROLES = ("system", "developer", "user", "assistant", "tool")
#: ShareGPT's speakers (``from``) -> roles; the roles' own names are accepted too.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"} | {r: r for r in ROLES}
#: The ``sft`` row formats, in the order :func:`detect_format` tries them.
SFT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt-completion", "text")
#: The fields of the formats that have no ``--*-field`` option.
SHAREGPT_FIELD = "conversations"
ALPACA_FIELDS = ("instruction", "input", "output")
_GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")


def detect_format(columns: Sequence[str], fields: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """The ``sft`` format of data with ``columns``, and the fields it reads.

    Args:
        columns: The data's field names.
        fields: Our name -> the data's field name, for ``messages``, ``prompt``, ``completion``,
            ``response`` and ``text`` (the ``--*-field`` options).

    Returns:
        The format (one of :data:`SFT_FORMATS`) and our name -> the data's field name: the
        conversation of ``messages`` and ``sharegpt`` under ``messages``; ``instruction``,
        ``output`` (and ``input`` if the data has it) for ``alpaca``; the answer of a pair under
        ``completion`` (read from the ``response`` field if the data has no ``completion``).

    Raises:
        DataError: If the data has none of the formats' fields (naming the fields it has).
    """
    have = set(columns)
    if fields["messages"] in have:
        return "messages", {"messages": fields["messages"]}
    if SHAREGPT_FIELD in have:
        return "sharegpt", {"messages": SHAREGPT_FIELD}
    instruction, _, output = ALPACA_FIELDS
    if instruction in have and output in have:
        return "alpaca", {k: k for k in ALPACA_FIELDS if k in have}
    if fields["prompt"] in have:
        for answer in ("completion", "response"):
            if fields[answer] in have:
                return "prompt-completion", {
                    "prompt": fields["prompt"],
                    "completion": fields[answer],
                }
    if fields["text"] in have:
        return "text", {"text": fields["text"]}
    raise DataError(
        f"--task sft needs a field {fields['messages']!r} (--messages-field), "
        f"{SHAREGPT_FIELD!r} (ShareGPT), {instruction!r} with {output!r} (Alpaca), "
        f"{fields['prompt']!r} with {fields['completion']!r} or {fields['response']!r} "
        f"(--prompt-field, --completion-field/--response-field), or {fields['text']!r} "
        f"(--text-field); the data's fields are: {', '.join(columns)}"
    )


def format_columns(columns: Sequence[str], fields: Mapping[str, str]) -> list[str]:
    """The ``columns`` that any ``sft`` format reads (to tell a row of another format)."""
    known = {*fields.values(), SHAREGPT_FIELD, *ALPACA_FIELDS}
    return [c for c in columns if c in known]


#: Per format: our names of the fields every row must have.
_REQUIRED = {
    "messages": ("messages",),
    "sharegpt": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt-completion": ("prompt", "completion"),
    "text": ("text",),
}


def normalize_rows(
    records: Sequence[Mapping[str, Any]],
    fmt: str,
    where: str,
    fields: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Checks rows of format ``fmt`` and brings them into one shape each.

    ``messages`` and ``sharegpt`` rows and conversational prompt/completion pairs become
    ``{"messages": [...], "first_trained": i}`` (assistant turns from index ``i`` on are
    learned); ``alpaca`` rows and text pairs become ``{"prompt", "completion"}``; ``text`` rows
    stay ``{"text"}``.

    Args:
        records: The rows. Without ``fields``, under our field names (those of
            :data:`_REQUIRED`); with it, under the data's names, other formats' fields included
            (to name them when a row is of another format).
        fmt: One of :data:`SFT_FORMATS`.
        where: How to name the rows' split in messages (``"the training split"``).
        fields: Our name -> the data's field name (:func:`detect_format`'s).

    Raises:
        DataError: For a row without its format's fields (a file mixing formats), an empty
            value, a malformed message, an unknown role or speaker, or no assistant turn to
            learn (naming the row, counted from 1).
    """
    names = dict(fields) if fields is not None else {k: k for k in _REQUIRED[fmt]}
    if fmt == "alpaca":
        names.setdefault("input", "input")
    out: list[dict[str, Any]] = []
    for i, record in enumerate(records, 1):
        _check_format(record, fmt, names, i, where)
        r = {ours: record.get(theirs) for ours, theirs in names.items()}
        if fmt == "text":
            out.append({"text": _text(r["text"], i, where, names["text"])})
        elif fmt in ("messages", "sharegpt"):
            messages = _messages(r["messages"], i, where)
            out.append({"messages": _with_assistant(messages, 0, i, where), "first_trained": 0})
        elif fmt == "alpaca":
            instruction = _text(r["instruction"], i, where, names["instruction"])
            extra = r.get("input")
            if extra is not None and not isinstance(extra, str):
                raise DataError(f"row {i} of {where} has a non-text {names['input']}: {extra!r}")
            if extra and extra.strip():
                instruction = f"{instruction}\n\n{extra}"
            output = _text(r["output"], i, where, names["output"])
            out.append({"prompt": instruction, "completion": output})
        elif isinstance(r["prompt"], list):
            prompt = _messages(r["prompt"], i, where)
            completion = r["completion"]
            if isinstance(completion, list):
                answer = _messages(completion, i, where)
            else:
                answer = [
                    {
                        "role": "assistant",
                        "content": _text(completion, i, where, names["completion"]),
                    }
                ]
            messages = _with_assistant([*prompt, *answer], len(prompt), i, where)
            out.append({"messages": messages, "first_trained": len(prompt)})
        else:
            out.append(
                {
                    "prompt": _text(r["prompt"], i, where, names["prompt"]),
                    "completion": _text(r["completion"], i, where, names["completion"]),
                }
            )
    return out


def _check_format(
    record: Mapping[str, Any], fmt: str, names: Mapping[str, str], row: int, where: str
) -> None:
    """Refuses a row without the fields of the data's format: a row of another format."""
    missing = [names[k] for k in _REQUIRED[fmt] if record.get(names[k]) is None]
    if not missing:
        return
    has = [k for k, v in record.items() if v is not None]
    raise DataError(
        f"row {row} of {where} has no {' or '.join(repr(m) for m in missing)}, which every row "
        f"of this data needs: its fields make it {fmt} data"
        + (
            f", but this row has {', '.join(has)}: one dataset cannot mix sft formats"
            if has
            else ""
        )
    )


def _text(value: Any, row: int, where: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"row {row} of {where} has an empty or non-text {what}: {value!r}")
    return value


def _messages(value: Any, row: int, where: str) -> list[dict[str, Any]]:
    """A conversation checked message by message, ShareGPT's turns as messages; ``None``
    entries (from Arrow) dropped."""
    if not isinstance(value, list) or not value:
        raise DataError(f"row {row} of {where}: messages must be a non-empty list, got {value!r}")
    out = []
    for j, m in enumerate(value, 1):
        if isinstance(m, Mapping):
            # Arrow gives every message every key any message has; a template reads None as set.
            m = {k: v for k, v in m.items() if v is not None}
        if isinstance(m, Mapping) and "role" not in m and "from" in m:
            speaker = m["from"]
            if speaker not in SHAREGPT_ROLES:
                raise DataError(
                    f"row {row} of {where}: message {j} has the unknown ShareGPT speaker "
                    f"{speaker!r} (speakers: human, gpt, system)"
                )
            rest = {k: v for k, v in m.items() if k not in ("from", "value")}
            m = {"role": SHAREGPT_ROLES[speaker], "content": m.get("value"), **rest}
        if not isinstance(m, Mapping) or "role" not in m:
            raise DataError(
                f"row {row} of {where}: message {j} has no role (nor ShareGPT's from): {m!r}"
            )
        if m.get("role") not in ROLES:
            raise DataError(
                f"row {row} of {where}: message {j} has the unknown role {m.get('role')!r} "
                f"(roles: {', '.join(ROLES)})"
            )
        if not isinstance(m.get("content"), str) and "tool_calls" not in m:
            raise DataError(f"row {row} of {where}: message {j} has no text content")
        out.append(dict(m))
    return out


def _with_assistant(
    messages: list[dict[str, Any]], first: int, row: int, where: str
) -> list[dict[str, Any]]:
    if not any(m["role"] == "assistant" for m in messages[first:]):
        raise DataError(f"row {row} of {where} has no assistant turn to learn from")
    return messages


# --- the system prompt and the chat template ---------------------------------------------------


def with_system_prompt(rows: Sequence[Mapping[str, Any]], system: str) -> list[dict[str, Any]]:
    """Rows of :func:`normalize_rows` whose conversations start with the system message ``system``.

    A conversation's own leading system messages are replaced; a text pair becomes a
    conversation (user, assistant) after it, which the chat template renders.

    Raises:
        DataError: For plain ``text`` rows, which have no conversation to put it in.
    """
    out = []
    for r in rows:
        if "text" in r:
            raise DataError(
                "--system-prompt is for conversations (messages, ShareGPT, Alpaca or "
                "prompt/completion data); this data is plain text"
            )
        if "messages" in r:
            messages, first = list(r["messages"]), r.get("first_trained", 0)
        else:
            messages = [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"]},
            ]
            first = 1
        kept = list(itertools.dropwhile(lambda m: m["role"] == "system", messages))
        dropped = len(messages) - len(kept)
        # Learned turns start at the same message: it moved by the system messages swapped.
        first = first - dropped + 1 if first else 0
        system_turn = {"role": "system", "content": system}
        out.append({"messages": [system_turn, *kept], "first_trained": first})
    return out


def chat_template_text(value: str) -> str:
    """The chat template ``--chat-template`` names: a Jinja string, or a file that holds one.

    A value with ``{{`` or ``{%`` is the template itself. A file is read as the template, except a
    ``.json`` file, which holds it under ``chat_template`` (``transformers``'
    ``chat_template.json``).

    Raises:
        DataError: If it is no template and no readable file with one.
    """
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise DataError(
            f"--chat-template {value!r} is neither a file nor a Jinja template "
            "(a template has {{ ... }} or {% ... %})"
        )
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            text = json.loads(text)["chat_template"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"--chat-template {path}: cannot read a chat template: {e!r}") from e
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"--chat-template {path} holds no chat template")
    return text


def set_chat_template(tokenizer: Any, value: str) -> None:
    """Makes ``tokenizer`` use the chat template ``value`` names (:func:`chat_template_text`).

    The template is tried on a short conversation first, so that a broken one is one line now,
    not a traceback in the middle of encoding.

    Raises:
        DataError: If it cannot be read or does not render a conversation.
    """
    template = chat_template_text(value)
    probe = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    previous = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception as e:  # a Jinja syntax or render error, or the template's raise_exception
        tokenizer.chat_template = previous
        raise DataError(
            f"--chat-template does not render a user and an assistant turn: {first_line(e)}"
        ) from e


# --- encoding ----------------------------------------------------------------------------------


def encode_sft(
    rows: Sequence[Mapping[str, Any]], tokenizer: Any, max_length: int
) -> list[dict[str, Any]]:
    """Tokenizes rows of :func:`normalize_rows`; ``labels`` is ``-100`` where nothing is learned.

    Over-long rows are cut at ``max_length`` tokens; a row left with nothing to learn is dropped
    with a warning.

    Raises:
        DataError: If the rows need a chat template the tokenizer lacks, or no row has anything
            left to learn.
    """
    if any("messages" in r for r in rows) and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "chat messages need a tokenizer with a chat template; this one has none "
            "(give one with --chat-template)"
        )
    out = []
    dropped = []
    for i, r in enumerate(rows, 1):
        ids, mask = _tokens(r, tokenizer)
        ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask):
            dropped.append(i)
            continue
        out.append(
            {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask, strict=True)]}
        )
    if dropped:
        logger.warning(
            "%d of %d examples have nothing left to learn within --max-length %d (e.g. row %d); "
            "they are left out",
            len(dropped),
            len(rows),
            max_length,
            dropped[0],
        )
    if not out:
        raise DataError(
            f"no example has anything left to learn within --max-length {max_length} "
            "(the prompts fill it); raise --max-length"
        )
    return out


def _tokens(row: Mapping[str, Any], tokenizer: Any) -> tuple[list[int], list[bool]]:
    """A row's token ids, and which of them are learned."""
    if "text" in row:
        ids = _with_eos(tokenizer(row["text"])["input_ids"], tokenizer)
        return ids, [True] * len(ids)
    if "messages" in row:
        return chat_tokens(row["messages"], tokenizer, row.get("first_trained", 0))
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]},
        ]
        return chat_tokens(messages, tokenizer)
    prompt = tokenizer(row["prompt"])["input_ids"]
    completion = _with_eos(
        tokenizer(row["completion"], add_special_tokens=False)["input_ids"], tokenizer
    )
    return [*prompt, *completion], [False] * len(prompt) + [True] * len(completion)


def _with_eos(ids: list[int], tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    return [*ids, eos] if eos is not None and (not ids or ids[-1] != eos) else list(ids)


def chat_tokens(
    messages: Sequence[Mapping[str, Any]], tokenizer: Any, first_trained: int = 0
) -> tuple[list[int], list[bool]]:
    """The conversation's tokens in the chat template, and which belong to assistant turns.

    Args:
        messages: The conversation.
        tokenizer: A tokenizer with a chat template.
        first_trained: Only assistant turns from this message index on count.

    Returns:
        Token ids, and per token whether it is the assistant's (see the module docstring).
    """
    template = tokenizer.chat_template
    if first_trained == 0 and isinstance(template, str) and _GENERATION_BLOCK.search(template):
        out = tokenizer.apply_chat_template(
            list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    text = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first_trained:
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1])
        start, end = _common_prefix(text, before), _common_prefix(text, upto)
        if end > start:
            spans.append((start, end))
    return _tokens_in_spans(tokenizer, text, spans)


def render(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], generation_prompt: bool = False
) -> str:
    """``messages`` as the chat template writes them (with the assistant's turn opened if
    ``generation_prompt``)."""
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )
    return str(text)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


def _tokens_in_spans(
    tokenizer: Any, text: str, spans: list[tuple[int, int]]
) -> tuple[list[int], list[bool]]:
    """Tokenizes ``text`` (no special tokens added: the template wrote them) and marks the tokens
    whose characters overlap ``spans``."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [e > s and any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]]
        return list(enc["input_ids"]), mask
    # A slow tokenizer has no character offsets: tokenize the stretches one by one.
    cuts = sorted({0, len(text), *(x for span in spans for x in span)})
    ids: list[int] = []
    mask = []
    for a, b in itertools.pairwise(cuts):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        inside = any(s <= a and b <= e for s, e in spans)
        ids.extend(piece)
        mask.extend([inside] * len(piece))
    return ids, mask
