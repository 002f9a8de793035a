"""The sft row formats: detection, checks, and which tokens are learned (chat loss mask)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hiftune.recipes import chat
from hiftune.recipes.sources import DataError

#: ChatML, as Qwen and SmolLM2 write it.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: The same template with the assistant's tokens marked for ``return_assistant_tokens_mask``.
CHATML_GENERATION = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>\n"
    "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is the capital of France? Paris.",
    "Say hello. Hello there! Be brief.",
    "user assistant system tool",
    "The quick brown fox jumps over the lazy dog.",
]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "Hello there!"},
]
FIELDS = {
    "messages": "messages",
    "prompt": "prompt",
    "completion": "completion",
    "response": "response",
    "text": "text",
}


def make_chat_tokenizer(template: str | None = CHATML):
    """A byte-level BPE tokenizer (decoding gives back the exact text) with ChatML tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = template
    return fast


def make_chat_model(path: Path) -> Path:
    """A 2-block llama with :func:`make_chat_tokenizer`, saved to ``path``."""
    from recipes.conftest import make_llama

    tok = make_chat_tokenizer()
    return make_llama(
        path, tok, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=None
    )


@pytest.fixture(scope="module")
def tok():
    return make_chat_tokenizer()


def learned_text(tokenizer, example: dict) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != -100])


# --- formats -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "fmt", "fields"),
    [
        (["messages", "text"], "messages", {"messages": "messages"}),
        (
            ["prompt", "completion", "text"],
            "prompt-completion",
            {"prompt": "prompt", "completion": "completion"},
        ),
        (
            ["prompt", "response"],
            "prompt-completion",
            {"prompt": "prompt", "completion": "response"},
        ),
        (["conversations", "id"], "sharegpt", {"messages": "conversations"}),
        # Alpaca's own files have a text field too (the whole prompt, formatted).
        (
            ["instruction", "input", "output", "text"],
            "alpaca",
            {"instruction": "instruction", "input": "input", "output": "output"},
        ),
        (["output", "instruction"], "alpaca", {"instruction": "instruction", "output": "output"}),
        (["id", "text"], "text", {"text": "text"}),
        (["prompt", "text"], "text", {"text": "text"}),  # a prompt without an answer is no pair
    ],
)
def test_format_is_detected_from_the_fields(columns, fmt, fields) -> None:
    assert chat.detect_format(columns, FIELDS) == (fmt, fields)


def test_field_names_are_overridable_and_missing_ones_are_listed() -> None:
    fields = {**FIELDS, "messages": "conversation"}
    assert chat.detect_format(["conversation"], fields) == (
        "messages",
        {"messages": "conversation"},
    )
    with pytest.raises(
        DataError,
        match=r"needs a field 'messages'.*'conversations' \(ShareGPT\).*fields are: id, body$",
    ):
        chat.detect_format(["id", "body"], FIELDS)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        (
            [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}],
            "row 2 of the training split: message 2 has the unknown role 'bot'",
        ),
        ([{"role": "user", "content": "hi"}], "row 2 of the training split has no assistant turn"),
        ([], "messages must be a non-empty list"),
        ([{"content": "hi"}], "message 1 has no role"),
        ([{"role": "assistant", "content": 3}], "message 1 has no text content"),
    ],
)
def test_bad_chat_rows_name_the_row(messages, match: str) -> None:
    good = {"messages": CONVERSATION}
    with pytest.raises(DataError, match=match):
        chat.normalize_rows([good, {"messages": messages}], "messages", "the training split")


#: :data:`CONVERSATION` as ShareGPT writes it.
SHAREGPT = [
    {
        "from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
        "value": m["content"],
    }
    for m in CONVERSATION
]


def test_sharegpt_conversations_are_messages() -> None:
    expected = chat.normalize_rows([{"messages": CONVERSATION}], "messages", "x")
    fields = {"messages": "conversations"}
    assert chat.normalize_rows([{"conversations": SHAREGPT}], "sharegpt", "x", fields) == expected
    # Arrow's nulls of a file whose turns mix both styles; --messages-field in ShareGPT's style.
    mixed = [{"from": None, "value": None, **CONVERSATION[0]}, *SHAREGPT[1:]]
    assert chat.normalize_rows([{"messages": mixed}], "messages", "x") == expected


@pytest.mark.parametrize(
    ("turn", "match"),
    [
        ({"from": "bot", "value": "yo"}, "message 2 has the unknown ShareGPT speaker 'bot'"),
        ({"speaker": "gpt", "text": "yo"}, "message 2 has no role \\(nor ShareGPT's from\\)"),
        ({"from": "gpt", "value": None}, "message 2 has no text content"),
    ],
)
def test_bad_sharegpt_turns_name_the_row(turn: dict, match: str) -> None:
    rows = [{"conversations": SHAREGPT}, {"conversations": [SHAREGPT[1], turn]}]
    with pytest.raises(DataError, match="row 2 of x: " + match):
        chat.normalize_rows(rows, "sharegpt", "x", {"messages": "conversations"})


def test_alpaca_rows_are_pairs_with_the_input_after_the_instruction(tok) -> None:
    fields = {"instruction": "instruction", "input": "input", "output": "output"}
    rows = chat.normalize_rows(
        [
            {"instruction": "Say hello.", "input": "Be brief.", "output": "Hello there!"},
            {"instruction": "Say hello.", "input": "", "output": "Hello there!"},
            {"instruction": "Say hello.", "input": None, "output": "Hello there!"},
        ],
        "alpaca",
        "x",
        fields,
    )
    pair = {"prompt": "Say hello.", "completion": "Hello there!"}
    assert rows == [{**pair, "prompt": "Say hello.\n\nBe brief."}, pair, pair]
    (ex,) = chat.encode_sft(rows[:1], tok, 256)
    assert learned_text(tok, ex) == "Hello there!<|im_end|>\n"
    # Without an input field at all (detect_format leaves it out), and a bad one.
    no_input = {"instruction": "instruction", "output": "output"}
    assert chat.normalize_rows(
        [{"instruction": "Say hello.", "output": "Hi"}], "alpaca", "x", no_input
    )
    with pytest.raises(DataError, match="row 1 of x has an empty or non-text output"):
        chat.normalize_rows([{"instruction": "Say hello.", "output": " "}], "alpaca", "x", fields)


def test_a_row_of_another_format_is_refused_by_name() -> None:
    # A JSONL file mixing formats: Arrow gives every row every field, None where it had none.
    rows = [
        {"messages": CONVERSATION, "instruction": None, "output": None},
        {"messages": None, "instruction": "Say hello.", "output": "Hi"},
    ]
    with pytest.raises(
        DataError,
        match="row 2 of x has no 'messages', which every row of this data needs: its fields make "
        "it messages data, but this row has instruction, output: one dataset cannot mix sft formats",
    ):
        chat.normalize_rows(rows, "messages", "x", {"messages": "messages"})
    with pytest.raises(DataError, match="row 1 of x has no 'completion' or 'prompt'"):
        chat.normalize_rows(
            [{"completion": None, "prompt": None}],
            "prompt-completion",
            "x",
            {"prompt": "completion", "completion": "prompt"},  # (renamed: the data's names count)
        )


def test_arrow_nulls_are_dropped_from_messages() -> None:
    (row,) = chat.normalize_rows(
        [
            {
                "messages": [
                    {"role": "user", "content": "hi", "tool_calls": None},
                    {"role": "assistant", "content": "yo", "tool_calls": None},
                ]
            }
        ],
        "messages",
        "x",
    )
    assert row["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]


# --- the chat loss mask ------------------------------------------------------------------------


def test_only_the_assistant_turns_are_learned(tok) -> None:
    (ex,) = chat.encode_sft(
        chat.normalize_rows([{"messages": CONVERSATION}], "messages", "x"), tok, 256
    )
    # The whole conversation is exactly the template's rendering ...
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    # ... and the labels are exactly the assistant turns as the template renders them.
    assert learned_text(tok, ex) == "Paris.<|im_end|>\nHello there!<|im_end|>\n"
    learned = [i for i, t in enumerate(ex["labels"]) if t != -100]
    assert all(ex["labels"][i] == ex["input_ids"][i] for i in learned)
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert tok.decode(ex["input_ids"][: learned[0]]) == prompt


def test_generation_block_templates_give_the_same_mask(tok) -> None:
    marked = make_chat_tokenizer(CHATML_GENERATION)
    # The template's own mask (return_assistant_tokens_mask) against the incremental rendering.
    assert chat.chat_tokens(CONVERSATION, marked) == chat.chat_tokens(CONVERSATION, tok)
    assert chat._GENERATION_BLOCK.search(CHATML_GENERATION) and not chat._GENERATION_BLOCK.search(
        CHATML
    )


def test_slow_tokenizer_path_marks_the_same_text(tok, monkeypatch: pytest.MonkeyPatch) -> None:
    ids, mask = chat.chat_tokens(CONVERSATION, tok)
    monkeypatch.setattr(type(tok), "is_fast", property(lambda self: False))
    slow_ids, slow_mask = chat.chat_tokens(CONVERSATION, tok)
    assert tok.decode(slow_ids) == tok.decode(ids)
    assert tok.decode([t for t, m in zip(slow_ids, slow_mask, strict=True) if m]) == tok.decode(
        [t for t, m in zip(ids, mask, strict=True) if m]
    )


def test_a_template_that_rewrites_earlier_turns_never_marks_template_text() -> None:
    # Earlier assistant turns are shortened once a later turn follows (as reasoning templates do).
    rewriting = make_chat_tokenizer(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'][:2] }}"
        "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    ids, mask = chat.chat_tokens(CONVERSATION, rewriting)
    learned = rewriting.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert learned.endswith("Hello there!<|im_end|>\n") and "user" not in learned


def test_prompt_completion_pairs(tok) -> None:
    rows = chat.normalize_rows(
        [{"prompt": "Say hello.", "completion": "Hello there!"}], "prompt-completion", "x"
    )
    (ex,) = chat.encode_sft(rows, tok, 256)
    pair = [
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello there!"},
    ]
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(pair, tokenize=False)
    assert learned_text(tok, ex) == "Hello there!<|im_end|>\n"
    # Without a chat template (a base model): the texts follow each other, EOS ends the answer.
    base = make_chat_tokenizer(None)
    (ex,) = chat.encode_sft(rows, base, 256)
    assert base.decode(ex["input_ids"]) == "Say hello.Hello there!<|im_end|>"
    assert learned_text(base, ex) == "Hello there!<|im_end|>"


def test_conversational_prompt_completion_learns_only_the_completion(tok) -> None:
    rows = chat.normalize_rows(
        [{"prompt": CONVERSATION[:4], "completion": "Hello there!"}], "prompt-completion", "x"
    )
    assert rows[0]["first_trained"] == 4
    (ex,) = chat.encode_sft(rows, tok, 256)
    assert learned_text(tok, ex) == "Hello there!<|im_end|>\n"  # not the earlier "Paris."


def test_plain_text_learns_every_token(tok) -> None:
    (ex,) = chat.encode_sft(
        chat.normalize_rows([{"text": "The quick brown fox."}], "text", "x"), tok, 256
    )
    assert ex["labels"] == ex["input_ids"]
    assert tok.decode(ex["input_ids"]) == "The quick brown fox.<|im_end|>"


def test_truncation_drops_examples_with_nothing_left_to_learn(tok, caplog) -> None:
    def prompt_tokens(messages: list[dict]) -> int:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    rows = chat.normalize_rows(
        [{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION}], "messages", "x"
    )
    short, long = prompt_tokens(CONVERSATION[1:2]), prompt_tokens(CONVERSATION[:2])
    assert short < long
    with caplog.at_level("WARNING"):
        out = chat.encode_sft(rows, tok, long)  # the long prompt fills it: nothing to learn
    assert len(out) == 1 and learned_text(tok, out[0]) == "Paris.<|im_end|>\n"
    assert "1 of 2 examples have nothing left to learn within --max-length" in caplog.text
    assert "(e.g. row 2)" in caplog.text
    with pytest.raises(DataError, match="raise --max-length"):
        chat.encode_sft(rows, tok, short)
    with pytest.raises(DataError, match="chat template"):
        chat.encode_sft(rows, make_chat_tokenizer(None), 256)


# --- the system prompt and the chat template ---------------------------------------------------


def test_system_prompt_replaces_the_datas_and_keeps_what_is_learned(tok) -> None:
    rows = [
        *chat.normalize_rows([{"messages": CONVERSATION}], "messages", "x"),  # has one
        *chat.normalize_rows(  # a conversational pair without one: its answer only is learned
            [{"prompt": CONVERSATION[1:4], "completion": "Hello there!"}], "prompt-completion", "x"
        ),
        {"prompt": "Say hello.", "completion": "Hello there!"},  # a text pair
    ]
    system = {"role": "system", "content": "Answer in one word."}
    out = chat.with_system_prompt(rows, "Answer in one word.")
    assert out == [
        {"messages": [system, *CONVERSATION[1:]], "first_trained": 0},
        {"messages": [system, *CONVERSATION[1:]], "first_trained": 4},
        {"messages": [system, *SAY_HELLO], "first_trained": 2},
    ]
    learned = [learned_text(tok, ex) for ex in chat.encode_sft(out, tok, 256)]
    assert learned == [
        "Paris.<|im_end|>\nHello there!<|im_end|>\n",
        "Hello there!<|im_end|>\n",
        "Hello there!<|im_end|>\n",
    ]
    with pytest.raises(DataError, match="--system-prompt is for conversations"):
        chat.with_system_prompt([{"text": "The quick brown fox."}], "Be brief.")


#: A pair as a conversation.
SAY_HELLO = [
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "Hello there!"},
]


def test_chat_template_from_a_string_or_a_file(tmp_path: Path) -> None:
    assert chat.chat_template_text(CHATML) == CHATML
    (tmp_path / "t.jinja").write_text(CHATML)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": CHATML}))
    assert chat.chat_template_text(str(tmp_path / "t.jinja")) == CHATML
    assert chat.chat_template_text(str(tmp_path / "chat_template.json")) == CHATML
    with pytest.raises(DataError, match="'chatml' is neither a file nor a Jinja template"):
        chat.chat_template_text("chatml")
    (tmp_path / "empty.jinja").write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jinja holds no chat template"):
        chat.chat_template_text(str(tmp_path / "empty.jinja"))


def test_set_chat_template_renders_with_it_or_refuses_it() -> None:
    base = make_chat_tokenizer(None)
    chat.set_chat_template(base, CHATML)
    (ex,) = chat.encode_sft([{"messages": SAY_HELLO, "first_trained": 0}], base, 256)
    assert base.decode(ex["input_ids"]) == make_chat_tokenizer().apply_chat_template(
        SAY_HELLO, tokenize=False
    )
    with pytest.raises(DataError, match="--chat-template does not render a user and an assistant"):
        chat.set_chat_template(base, "{% for m in messages %}{{ m.content }")
    assert base.chat_template == CHATML  # a refused template leaves the tokenizer's


# --- end to end ---------------------------------------------------------------------------------


def test_sft_on_messages_from_a_hub_model_and_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``hiftune train`` with a model and a dataset given by Hub ids, from an offline cache."""
    from hiftune.cli import main
    from recipes.hubcache import HubCache

    hub = HubCache(tmp_path, monkeypatch)
    hub.add_model("org/tiny-chat", make_chat_model(tmp_path / "model"))
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Say hello {i}."},
                {"role": "assistant", "content": "Hello there!"},
            ]
        }
        for i in range(23)
    ]
    hub.add_dataset("org/chats", {"train": rows[:20], "test": rows[20:]})
    out = tmp_path / "run"
    code = main([
        "train", "--model", "org/tiny-chat", "--task", "sft", "--data", "org/chats",
        "--max-steps", "2", "--batch-size", "4", "--units-per-group", "2", "--output-dir", str(out),
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    run = json.loads((out / "hiftune_run.json").read_text())
    # The whole training split is used (no subset), and the data's own test split evaluates.
    assert run["data_splits"] == "train: 20 ('train' split); eval: 3 ('test' split)"
    assert run["identity"]["model"] == "org/tiny-chat" and run["identity"]["data"] == "org/chats"
    report = json.loads((out / "report.json").read_text())
    assert report["final"]["loss"] > 0


def test_bad_chat_data_is_one_line_from_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_llama: Path
) -> None:
    from hiftune.cli import main

    rows = [{"messages": CONVERSATION}] * 3 + [{"messages": [{"role": "narrator", "content": "x"}]}]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["train", "--model", str(tiny_llama), "--task", "sft", "--data", str(data),
                 "--eval-fraction", "0.25", "--output-dir", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("hiftune train: error:")]
    assert "message 1 has the unknown role 'narrator'" in line and "row " in line
    assert not (tmp_path / "run").exists()  # nothing written


def test_an_empty_answer_to_a_conversational_prompt_is_named_by_the_users_field() -> None:
    # A prompt given as messages, its answer as text under the user's own field name.
    fields = {"prompt": "question", "completion": "reply"}
    row = {"question": [{"role": "user", "content": "Say hello."}], "reply": " "}
    with pytest.raises(DataError, match="row 1 of x has an empty or non-text reply"):
        chat.normalize_rows([row], "prompt-completion", "x", fields)
