"""The examples must keep running (short settings)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("plain_pytorch.py", ["--cycles", "3", "--offload", "disk"]),
        ("trainer.py", ["--max-steps", "8"]),
    ],
)
def test_example_runs(script, args, tmp_path):
    if script == "trainer.py":
        args = [*args, "--output-dir", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    if script == "plain_pytorch.py":
        losses = [
            float(line.split("loss ")[1].split()[0])
            for line in result.stdout.splitlines()
            if line.startswith("cycle")
        ]
        assert len(losses) == 3 and losses[-1] < losses[0]


def test_chat_sft_example_trains_a_chat_model_on_messages(tmp_path):
    from safetensors.torch import load_file

    from recipes.conftest import make_llama  # the tiny llama with a chat template (no download)

    model_dir = make_llama(tmp_path / "model")
    chats = [
        {"messages": [{"role": "user", "content": f"review : {text}"},
                      {"role": "assistant", "content": answer}]}
        for text, answer in [("a great movie", "positive"), ("dull acting", "negative")] * 8
    ]  # fmt: skip
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    out_dir = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "chat_sft.py"), "--model", str(model_dir), "--data",
         str(data), "--output-dir", str(out_dir), "--max-steps", "8", "--lr", "1e-2"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    first, last = map(float, result.stdout.split("loss ")[1].split(";")[0].split(" -> "))
    assert last < first
    trained, base = (
        load_file(out_dir / "model.safetensors"),
        load_file(model_dir / "model.safetensors"),
    )
    for name in base:  # two cycles of 4 groups: every weight trained
        assert not torch.equal(trained[name], base[name]), name


def test_python_dash_m_hiftune_shows_the_commands():
    result = subprocess.run(
        [sys.executable, "-m", "hiftune", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for command in ("train", "estimate", "profile"):
        assert command in result.stdout
