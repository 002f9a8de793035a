"""Supervised fine-tuning rows: chat ``messages``, ``prompt``/``completion`` pairs, plain ``text``.

``--task sft`` takes the three row formats of the ecosystem (TRL's ``SFTTrainer`` conventions);
:func:`detect_format` picks one from the fields the data has, in this order:

* ``messages``: a list of ``{"role", "content"}`` turns; the loss is on the assistant turns
  (their content and the template's end-of-turn text);
* ``prompt-completion``: ``prompt`` with ``completion`` (or the older ``response``); the loss is
  on the completion;
* ``text``: plain text; the loss is on every token (language modelling).

Conversations are rendered with the tokenizer's chat template (a tokenizer without one cannot
take ``messages``). A prompt/completion pair is a user turn and an assistant turn in the chat
template when the tokenizer has one; without one (a base model), the completion's text and the
end-of-sequence token follow the prompt's text directly. A prompt may also be a list of messages
(and the completion a list or a string): then only the completion's assistant turns are learned.
Plain ``text`` gets the end-of-sequence token appended.

Which tokens belong to the assistant: a template that marks them (``{% generation %}``) answers
through ``return_assistant_tokens_mask``. Otherwise the conversation is rendered incrementally:
an assistant turn's text is what rendering the turns up to it adds to rendering the turns before
it with the generation prompt; the tokens of the whole rendering whose characters fall in those
stretches are the assistant's. (A template that rewrites earlier turns once more follow falls back
to the common prefix of the renderings, so template text never counts as the assistant's.)
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .sources import DataError

logger = logging.getLogger(__name__)

#: The roles a conversation may use.
ROLES = ("system", "developer", "user", "assistant", "tool")
#: The ``sft`` row formats, in the order :func:`detect_format` tries them.
SFT_FORMATS = ("messages", "prompt-completion", "text")
_GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")


def detect_format(columns: Sequence[str], fields: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """The ``sft`` format of data with ``columns``, and the fields it reads.

    Args:
        columns: The data's field names.
        fields: Our name -> the data's field name, for ``messages``, ``prompt``, ``completion``,
            ``response`` and ``text`` (the ``--*-field`` options).

    Returns:
        The format (one of :data:`SFT_FORMATS`) and our name -> the data's field name, with the
        answer of a pair under ``completion`` (read from the ``response`` field if the data has
        no ``completion`` field).

    Raises:
        DataError: If the data has none of the formats' fields (naming the fields it has).
    """
    have = set(columns)
    if fields["messages"] in have:
        return "messages", {"messages": fields["messages"]}
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
        f"{fields['prompt']!r} with {fields['completion']!r} or {fields['response']!r} "
        f"(--prompt-field, --completion-field/--response-field), or {fields['text']!r} "
        f"(--text-field); the data's fields are: {', '.join(columns)}"
    )


def normalize_rows(
    records: Sequence[Mapping[str, Any]], fmt: str, where: str
) -> list[dict[str, Any]]:
    """Checks rows of format ``fmt`` (our field names) and brings them into one shape each.

    ``messages`` rows and conversational prompt/completion pairs become ``{"messages": [...],
    "first_trained": i}`` (assistant turns from index ``i`` on are learned); text pairs stay
    ``{"prompt", "completion"}``; ``text`` rows stay ``{"text"}``.

    Args:
        records: The rows, with our field names (see :func:`detect_format`).
        fmt: One of :data:`SFT_FORMATS`.
        where: How to name the rows' split in messages (``"the training split"``).

    Raises:
        DataError: For a row with an empty value, a malformed message, an unknown role or no
            assistant turn to learn (naming the row, counted from 1).
    """
    out: list[dict[str, Any]] = []
    for i, r in enumerate(records, 1):
        if fmt == "text":
            out.append({"text": _text(r["text"], i, where, "text")})
        elif fmt == "messages":
            messages = _messages(r["messages"], i, where)
            out.append({"messages": _with_assistant(messages, 0, i, where), "first_trained": 0})
        elif isinstance(r["prompt"], list):
            prompt = _messages(r["prompt"], i, where)
            completion = r["completion"]
            if isinstance(completion, list):
                answer = _messages(completion, i, where)
            else:
                answer = [
                    {"role": "assistant", "content": _text(completion, i, where, "completion")}
                ]
            messages = _with_assistant([*prompt, *answer], len(prompt), i, where)
            out.append({"messages": messages, "first_trained": len(prompt)})
        else:
            out.append(
                {
                    "prompt": _text(r["prompt"], i, where, "prompt"),
                    "completion": _text(r["completion"], i, where, "completion"),
                }
            )
    return out


def _text(value: Any, row: int, where: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"row {row} of {where} has an empty or non-text {what}: {value!r}")
    return value


def _messages(value: Any, row: int, where: str) -> list[dict[str, Any]]:
    """A conversation checked message by message; ``None`` entries (from Arrow) dropped."""
    if not isinstance(value, list) or not value:
        raise DataError(f"row {row} of {where}: messages must be a non-empty list, got {value!r}")
    out = []
    for j, m in enumerate(value, 1):
        if not isinstance(m, Mapping) or "role" not in m:
            raise DataError(f"row {row} of {where}: message {j} has no role: {m!r}")
        # Arrow gives every message every key any message has; a template reads None as set.
        m = {k: v for k, v in m.items() if v is not None}
        if m.get("role") not in ROLES:
            raise DataError(
                f"row {row} of {where}: message {j} has the unknown role {m.get('role')!r} "
                f"(roles: {', '.join(ROLES)})"
            )
        if not isinstance(m.get("content"), str) and "tool_calls" not in m:
            raise DataError(f"row {row} of {where}: message {j} has no text content")
        out.append(m)
    return out


def _with_assistant(
    messages: list[dict[str, Any]], first: int, row: int, where: str
) -> list[dict[str, Any]]:
    if not any(m["role"] == "assistant" for m in messages[first:]):
        raise DataError(f"row {row} of {where} has no assistant turn to learn from")
    return messages


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
        raise DataError("chat messages need a tokenizer with a chat template; this one has none")
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
    text = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first_trained:
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1])
        start, end = _common_prefix(text, before), _common_prefix(text, upto)
        if end > start:
            spans.append((start, end))
    return _tokens_in_spans(tokenizer, text, spans)


def _render(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], generation_prompt: bool = False
) -> str:
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


def generation_prompt(row: Mapping[str, Any], tokenizer: Any) -> tuple[str, str] | None:
    """A normalized row as a prompt to generate from, and the reference answer.

    For a conversation: everything before its last assistant turn, rendered with the generation
    prompt, and that turn's content; for a pair: the prompt (in the chat template if the
    tokenizer has one) and the completion. ``None`` for ``text`` rows (no prompt to answer).
    """
    if "text" in row:
        return None
    if "messages" in row:
        messages = list(row["messages"])
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if last == 0:  # an answer to nothing: no prompt to generate from
            return None
        return (
            _render(tokenizer, messages[:last], generation_prompt=True),
            str(messages[last].get("content", "")),
        )
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": row["prompt"]}]
        return _render(tokenizer, user, generation_prompt=True), str(row["completion"])
    return str(row["prompt"]), str(row["completion"])
