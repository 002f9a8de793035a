"""Held-out prompts of generation tasks, answered greedily by the base and fine-tuned models."""

from __future__ import annotations

from pathlib import Path

import torch

from hiftune.recipes.samples import IGNORED, Prompt, generate, held_out_prompts, samples_record


def test_prompt_is_what_precedes_the_supervised_tokens() -> None:
    sft = {"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORED, IGNORED, IGNORED, 8, 9]}
    text = {"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}  # language modelling throughout
    assert held_out_prompts([sft, text]) == [Prompt([5, 6, 7], [8, 9]), Prompt([5, 6], [7, 8])]
    assert held_out_prompts([sft] * 5, n=2) == [Prompt([5, 6, 7], [8, 9])] * 2
    # Classification: one class id per example, no generation.
    assert held_out_prompts([{"input_ids": [5, 6], "labels": 1}]) == []


def test_generate_is_greedy_and_leaves_the_model_as_it_was(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompt = Prompt(tok("review : dull acting")["input_ids"], [])
    model.train()
    (answer,) = generate(model, tok, [prompt], max_new_tokens=5)
    assert model.training
    # Reference: a naive argmax loop without a cache, stopping at the end-of-sequence token.
    ids = list(prompt.ids)
    with torch.no_grad():
        model.eval()
        for _ in range(5):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == tok.eos_token_id:
                break
    assert answer and answer == tok.decode(ids[len(prompt.ids) :], skip_special_tokens=True)
    (record,) = samples_record(tok, [Prompt(prompt.ids, [12, 13])], [answer])
    assert record == {
        "prompt": "review : dull acting",
        "reference": "great terrible",
        "base": answer,
    }
