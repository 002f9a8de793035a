"""The examples must keep running (short settings)."""

import subprocess
import sys
from pathlib import Path

import pytest

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


def test_python_dash_m_hiftune_shows_the_commands():
    result = subprocess.run(
        [sys.executable, "-m", "hiftune", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for command in ("train", "estimate", "profile"):
        assert command in result.stdout
