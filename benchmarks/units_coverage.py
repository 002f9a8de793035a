"""How many of transformers' architectures the unit split handles: the coverage figure of the README.

For every model type in transformers' causal-LM, seq2seq-LM and masked-LM auto mappings, build a tiny
model from its default config (``tests/tinymodels.tiny_auto_model``) and run the checks of
``tests/engine/test_architectures.py::test_architecture`` on it (every parameter in one group, one
block per unit, one cycle updates everything, truncation builds no graph below the active block, a
single group equals plain AdamW). Writes ``docs/units/coverage.json`` and prints the counts.

Run from the repository root (about 20 minutes on 2 cores, one torch thread)::

    .venv/bin/python benchmarks/units_coverage.py
"""

from __future__ import annotations

import copy
import json
import logging
import signal
import sys
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "engine")]

import test_architectures  # noqa: E402
import torch  # noqa: E402
from transformers.models.auto import modeling_auto  # noqa: E402

from tinymodels import tiny_auto_model  # noqa: E402

HEADS = {
    "causal-lm": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "seq2seq-lm": modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    "masked-lm": modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
}
TIMEOUT_S = 30
MAX_PARAMS = 3_000_000  # a "tiny" model; larger defaults are skipped, not counted


class _Timeout(Exception):
    pass


def _alarm(*_: object) -> None:
    raise _Timeout


def check(model_type: str, head: str) -> str:
    """``"ok"``, ``"FAIL ..."`` (built, a check failed) or why no tiny model could be built."""
    try:
        model = tiny_auto_model(model_type, head).eval()
        if sum(p.numel() for p in model.parameters()) > MAX_PARAMS:
            return "not tiny"
        copy.deepcopy(model)(**test_architectures._batch(model, head)).loss.backward()
    except BaseException as e:  # any failure to build or run it: "no tiny model"
        return f"no tiny model: {type(e).__name__}"
    try:
        n_blocks = 4 if getattr(model.config, "is_encoder_decoder", False) else 2
        test_architectures.test_architecture(model_type, head, n_blocks)
        return "ok"
    except BaseException as e:  # a failed check is reported, not raised
        where = traceback.extract_tb(e.__traceback__)[-1]
        first = str(e).splitlines()[0][:150] if str(e) else ""
        return f"FAIL {type(e).__name__}: {first} @ {Path(where.filename).name}:{where.lineno}"


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    results: dict[str, str] = {}
    for head, mapping in HEADS.items():
        for model_type in mapping:
            signal.alarm(TIMEOUT_S)
            try:
                results[f"{model_type}/{head}"] = check(model_type, head)
            except _Timeout:
                results[f"{model_type}/{head}"] = "FAIL timeout"
            finally:
                signal.alarm(0)
            print(model_type, head, results[f"{model_type}/{head}"], flush=True)
    out = ROOT / "docs" / "units" / "coverage.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    built = [v for v in results.values() if v == "ok" or v.startswith("FAIL")]
    ok = sum(v == "ok" for v in built)
    print(f"tried {len(results)}, tiny model built {len(built)}, checks pass {ok}; wrote {out}")


if __name__ == "__main__":
    main()
