"""Held-out prompts of sft: what is asked, batched greedy answers, and their metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hiftune.recipes import chat, samples
from hiftune.recipes.samples import HeldOut, Prompt, generate, held_out_prompts, prompt_of
from recipes.test_chat import CONVERSATION, make_chat_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_chat_tokenizer()


def test_a_conversation_asks_what_precedes_its_last_answer(tok) -> None:
    (row,) = chat.with_system_prompt(
        chat.normalize_rows([{"messages": CONVERSATION}], "messages", "x"), "Be brief."
    )
    prompt = prompt_of(row, tok)
    text = tok.apply_chat_template(row["messages"][:4], tokenize=False, add_generation_prompt=True)
    assert prompt == Prompt(tok(text)["input_ids"], "Say hello.", "Hello there!")
    # The question shown is the user's turn, whole, not the system prompt around it.
    assert "Be brief." in tok.decode(prompt.ids) and prompt.question == "Say hello."


def test_pairs_and_text_as_prompts(tok) -> None:
    pair = {"prompt": "What is the capital of France?", "completion": "Paris."}
    chat_prompt = prompt_of(pair, tok)
    as_chat = tok.apply_chat_template(
        [{"role": "user", "content": pair["prompt"]}], tokenize=False, add_generation_prompt=True
    )
    assert chat_prompt == Prompt(tok(as_chat)["input_ids"], pair["prompt"], "Paris.")
    base = make_chat_tokenizer(None)  # no chat template: the prompt's text, as trained
    assert prompt_of(pair, base) == Prompt(
        base(pair["prompt"])["input_ids"], pair["prompt"], "Paris."
    )
    ids = base("The quick brown fox.")["input_ids"]
    half = len(ids) // 2
    assert prompt_of({"text": "The quick brown fox."}, base) == Prompt(
        ids[:half], "The quick", "brown fox.", scored=False
    )
    answer_to_nothing = {"messages": [{"role": "assistant", "content": "Hi."}]}
    assert prompt_of(answer_to_nothing, tok) is None


def test_held_out_prompts_skip_those_training_cuts_before_the_answer(tok) -> None:
    short = {"prompt": "Say hello.", "completion": "Hello there!"}
    long = {"prompt": "Say hello. " * 20, "completion": "Hello there!"}
    limit = len(prompt_of(long, tok).ids)  # the long prompt fills --max-length
    assert len(prompt_of(short, tok).ids) < limit
    prompts = held_out_prompts([long, short, short, short], tok, limit, n=2)
    assert prompts == [prompt_of(short, tok)] * 2


def naive_greedy(model, ids: list[int], n: int, eos: int) -> list[int]:
    """Argmax decoding without a cache or padding: the reference for :func:`generate`."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos:
                break
    return out[len(ids) :]


def test_batched_generation_is_greedy_and_in_order(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    texts = ["review : dull acting", "a great movie and a lovely story", "the plot"]
    prompts = [Prompt(tok(t)["input_ids"], t, "") for t in texts]  # three lengths: padding
    model.train()
    answers = generate(model, tok, prompts, max_new_tokens=6, batch_size=2)
    assert model.training  # restored
    model.eval()
    expected = [
        tok.decode(
            naive_greedy(model, p.ids, 6, tok.eos_token_id), skip_special_tokens=True
        ).strip()
        for p in prompts
    ]
    assert answers == expected and all(answers)


def test_held_out_scores_every_prompt_and_shows_the_first(monkeypatch, tok) -> None:
    rows = [{"prompt": f"Say hello {i}.", "completion": "Hello there!"} for i in range(5)]
    rows.append({"text": "The quick brown fox."})  # a sample, never scored
    held_out = HeldOut.build(rows, tok, 128, batch_size=4)
    assert held_out is not None and len(held_out.prompts) == 6
    asked: list[list[str]] = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc):
        asked.append([p.question for p in prompts])
        assert (max_new_tokens, batch_size) == (samples.MIN_NEW_TOKENS, 4)
        return ["Hello there!", "hello there", "Hello", "no", "Hi there!", "jumps"][: len(prompts)]

    monkeypatch.setattr(samples, "generate", fake_generate)
    metrics: dict = {"loss": 1.0}
    base = held_out.answer(None, metrics, "zero-shot")
    assert base == ["Hello there!", "hello there", "Hello"]
    # Five scored answers: two exact; ROUGE-L 1, 1, 2/3, 0, 1/2.
    assert metrics == {
        "loss": 1.0,
        "exact_match": 0.4,
        "rouge_l": pytest.approx((1 + 1 + 2 / 3 + 0 + 0.5) / 5),
        "generation_prompts": 5,
    }
    assert held_out.answer(None, None, "zero-shot") == base  # no metrics: the samples only
    assert [len(a) for a in asked] == [6, samples.SAMPLES]
    records = held_out.samples(base)
    held_out.add_fine_tuned(records, ["a", "b", "c"])
    assert records[0] == {
        "prompt": "Say hello 0.",
        "reference": "Hello there!",
        "base": "Hello there!",
        "fine_tuned": "a",
    }
    # A resumed run keeps its checkpoint's base answers to the same prompts only.
    assert held_out.resumed_samples(records) == records
    assert held_out.resumed_samples([{"prompt": "other"}]) == held_out.samples(None)
    assert (
        HeldOut.build([{"messages": [{"role": "assistant", "content": "x"}]}], tok, 128, 4) is None
    )


def test_sft_report_shows_whether_it_learned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ShareGPT data, a system prompt and a chat template from a file, end to end: the
    report's exact match and ROUGE-L go from nothing to everything on a learned answer."""
    import json

    from hiftune.cli import main
    from recipes.conftest import make_llama
    from recipes.test_chat import CHATML

    # A base model: its tokenizer has no chat template; --chat-template gives one.
    model = make_llama(
        tmp_path / "model",
        make_chat_tokenizer(None),
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=None,
    )
    (tmp_path / "chatml.jinja").write_text(CHATML)
    rows = [
        {"conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": f"Say hello {i}."},
            {"from": "gpt", "value": "Hello there!"},
        ]}
        for i in range(24)
    ]  # fmt: skip
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    code = main([
        "train", "--model", str(model), "--task", "sft", "--data", str(data),
        "--eval-fraction", "0.25", "--system-prompt", "Answer in two words.",
        "--chat-template", str(tmp_path / "chatml.jinja"), "--method", "fpft", "--lr", "0.03",
        "--max-steps", "12", "--batch-size", "6", "--output-dir", str(out),
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    before, after = report["zero_shot"], report["final"]
    assert (before["generation_prompts"], after["generation_prompts"]) == (6, 6)
    assert before["exact_match"] == 0.0 and before["rouge_l"] < 0.5  # a random model
    assert (after["exact_match"], after["rouge_l"]) == (1.0, 1.0)
    sample = report["samples"][0]
    assert sample["prompt"].startswith("Say hello ") and sample["fine_tuned"] == "Hello there!"
    assert "| exact_match | rouge_l |" in (out / "report.md").read_text()
    assert "exact_match 1.0000, rouge_l 1.0000" in captured.out
    # The fine-tuned model's tokenizer has the template it was trained with.
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML
