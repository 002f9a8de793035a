"""The ``hiftune`` entry point: what parsing a command line costs, --version, unknown options."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

import hiftune
from hiftune.cli import main, parse_args

#: Each command line, then which of the heavy packages it left loaded; run in one fresh
#: interpreter, in this order (what an earlier line loaded stays loaded).
_PROBE = """
import json, sys
from hiftune.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
    except SystemExit as e:
        pass
    out.append({m: m in sys.modules for m in ("torch", "transformers")})
print(json.dumps(out), file=sys.__stderr__)
"""


def test_help_version_and_bad_options_do_not_import_transformers() -> None:
    lines = [
        ["--version"],
        ["--help"],
        ["train", "--help"],
        ["train", "--no-such-option", "1"],
        ["train", "--lr", "fast"],
        ["estimate", "--help"],
        ["inspect", "--help"],
    ]
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(lines)],
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = json.loads(done.stderr.strip().splitlines()[-1])
    # The top level answers without torch; no command line here needs transformers.
    assert loaded[1] == {"torch": False, "transformers": False}
    assert not any(state["transformers"] for state in loaded), loaded


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"hiftune {hiftune.__version__}\n"


def test_an_unknown_option_is_refused_with_a_suggestion(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(["train", "--optimiser", "sgd"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --optimiser (did you mean --optimizer?)" in err


def test_the_suggestion_does_not_depend_on_transformers_being_imported(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # As in a process (a test session, a notebook) that imported transformers before parsing.
    importlib.import_module("transformers.training_args")
    with pytest.raises(SystemExit):
        parse_args(["train", "--optimiser", "sgd"])
    assert "(did you mean --optimizer?)" in capsys.readouterr().err


def test_training_arguments_and_abbreviations_still_parse() -> None:
    args = parse_args(["train", "--report-to", "none", "--overwrite", "--units-per", "3"])
    assert (args.report_to, args.overwrite_output_dir, args.units_per_group) == ("none", True, 3)
    # --optim is transformers' option (refused later, with its reason), not --optimizer cut short.
    assert parse_args(["train", "--optim", "sgd"]).optim == "sgd"
