"""How many of transformers' architectures the unit split handles: the coverage figure of the README.

For every model type in transformers' causal-LM, seq2seq-LM and masked-LM auto mappings, and its
image-classification, CTC, speech-seq2seq and image-text-to-text ones, build a tiny model from its
default config (``tests/tinymodels.tiny_auto_model``) and run the checks of
``tests/engine/test_architectures.py::test_architecture`` on it with the paper's split and with the
default one (every parameter in one group, one block per unit, one cycle updates everything,
truncation builds no graph below the active block, a single group equals plain AdamW); a type
passes only if both do. Writes ``docs/units/coverage.json`` and prints the counts.

The number of blocks the checks expect is found without the split under test (see
:func:`expected_blocks`), so a unit holding two blocks, or a block cut into pieces, still fails.

Run from the repository root (about 20 minutes on 2 cores, one torch thread)::

    .venv/bin/python benchmarks/units_coverage.py
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import signal
import sys
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "engine")]

import test_architectures  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers.models.auto import modeling_auto  # noqa: E402

from tinymodels import tiny_auto_model  # noqa: E402

HEADS: dict[str, Mapping[str, Any]] = {
    "causal-lm": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "seq2seq-lm": modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    "masked-lm": modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    # Vision and audio towers (``tinymodels.MODALITY_HEADS``: small images, spectrograms, one conv).
    "image-cls": modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    "ctc": modeling_auto.MODEL_FOR_CTC_MAPPING_NAMES,
    "speech-seq2seq": modeling_auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES,
    "image-text-to-text": modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
}
SPLITS = ("paper", "default")
TIMEOUT_S = 30  # per split
MAX_PARAMS = 3_000_000  # a "tiny" model; larger defaults are skipped, not counted

#: Blocks per stack of a tiny model: ``tinymodels.TINY_FIELDS`` sets every layer count it knows
#: (``num_hidden_layers``, ``encoder_layers``, ``num_decoder_layers``, ...) to 2.
TINY_LAYERS = 2

#: Distinct blocks by config, for the types (``"<model_type>/<head>"``, as in the results) whose
#: config sizes the blocks by fields the tiny config leaves at their defaults, or whose forward
#: calls one block several times.
CONFIG_BLOCKS: dict[str, Callable[[Any], int]] = {
    # One set of inner_group_num layers per group, shared by all num_hidden_layers calls.
    "albert/masked-lm": lambda c: c.num_hidden_groups * c.inner_group_num,
    # Encoder blocks of block_sizes layers (each called block_repeats times), then the decoder.
    "funnel/masked-lm": lambda c: sum(c.block_sizes) + c.num_decoder_layers,
    # num_encoder_layers is not among the tiny fields.
    "prophetnet/seq2seq-lm": lambda c: c.num_encoder_layers + c.num_decoder_layers,
}


class _Timeout(Exception):
    pass


def _alarm(*_: object) -> None:
    raise _Timeout


def expected_blocks(model: nn.Module, head: str, batch: dict[str, torch.Tensor]) -> int:
    """How many blocks ``model`` has, found without the unit split.

    :data:`CONFIG_BLOCKS` for the types listed there. Otherwise the layers the forward pass on
    ``batch`` calls: the called elements of each ``ModuleList`` that holds a called module of a
    class the model names in ``_no_split_modules`` (with the list's other called elements: a
    hybrid's Mamba or linear-attention layers of another class), or two or more called modules
    that have submodules, not counting modules inside another counted one (experts inside a
    layer). Else two per stack of
    the tiny config: four for an encoder-decoder, two otherwise.
    """
    config: Any = model.config
    by_config = CONFIG_BLOCKS.get(f"{config.model_type}/{head}")
    if by_config is not None:
        return by_config(config)
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    lists = {id(child): m for m in model.modules() if isinstance(m, nn.ModuleList) for child in m}
    called: dict[int, nn.Module] = {}

    def on_call(module: nn.Module, _: object) -> None:
        called.setdefault(id(module), module)

    handles = [
        m.register_forward_pre_hook(on_call)
        for m in model.modules()
        if id(m) in lists and any(True for _ in m.parameters())
    ]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    layers = [m for m in called.values() if type(m).__name__ in no_split]
    holders = {id(lists[id(m)]) for m in layers}
    # Also lists of two or more called layers (modules with submodules) of classes the model does
    # not name: Speech2Text names its encoder layer only, not its decoder layer.
    nested_calls = Counter(
        id(lists[id(m)]) for m in called.values() if any(True for _ in m.children())
    )
    holders |= {holder for holder, n in nested_calls.items() if n >= 2}
    blocks = [m for m in called.values() if id(lists[id(m)]) in holders]
    inner = {id(sub) for m in blocks for sub in m.modules() if sub is not m}
    count = sum(id(m) not in inner for m in blocks)
    if count:
        return count
    return TINY_LAYERS * (2 if getattr(config, "is_encoder_decoder", False) else 1)


def check(model_type: str, head: str) -> str:
    """``"ok"``, ``"FAIL ..."`` (built, a check failed) or why no tiny model could be built.

    Each phase (building and counting, then each split's checks) gets :data:`TIMEOUT_S`.
    """
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        return _check(model_type, head)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _check(model_type: str, head: str) -> str:
    signal.alarm(TIMEOUT_S)
    try:
        model = tiny_auto_model(model_type, head).eval()
        if sum(p.numel() for p in model.parameters()) > MAX_PARAMS:
            return "not tiny"
        batch = test_architectures._batch(model, head)
        copy.deepcopy(model)(**batch).loss.backward()
    except _Timeout:
        return f"no tiny model: timeout building ({TIMEOUT_S} s)"
    except BaseException as e:  # any failure to build or run it: "no tiny model"
        return f"no tiny model: {type(e).__name__}"
    try:
        n_blocks = expected_blocks(model, head, batch)
    except BaseException as e:  # _Timeout included
        return f"FAIL counting blocks: {type(e).__name__}: {_first_line(e)}"
    for split in SPLITS:
        signal.alarm(TIMEOUT_S)
        try:
            test_architectures.test_architecture(model_type, head, n_blocks, split)
        except _Timeout:
            return f"FAIL {split}: timeout ({TIMEOUT_S} s)"
        except BaseException as e:  # a failed check is reported, not raised
            where = traceback.extract_tb(e.__traceback__)[-1]
            return (
                f"FAIL {split}: {type(e).__name__}: {_first_line(e)} "
                f"@ {Path(where.filename).name}:{where.lineno}"
            )
    return "ok"


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0][:150] if str(e) else ""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--heads", nargs="+", choices=list(HEADS), default=list(HEADS))
    p.add_argument("--pairs", nargs="+", metavar="TYPE/HEAD", help="re-run only these")
    a = p.parse_args(argv)
    pairs = [tuple(pair.split("/", 1)) for pair in a.pairs or []]
    if any(len(pair) != 2 or pair[1] not in HEADS for pair in pairs):
        p.error(f"--pairs takes model_type/head with a head of {', '.join(HEADS)}")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    out = ROOT / "docs" / "units" / "coverage.json"
    # Heads not run this time keep their earlier results.
    results: dict[str, str] = json.loads(out.read_text()) if out.is_file() else {}
    todo = pairs or [(model_type, head) for head in a.heads for model_type in HEADS[head]]
    for model_type, head in todo:
        results[f"{model_type}/{head}"] = check(model_type, head)
        print(model_type, head, results[f"{model_type}/{head}"], flush=True)
    results = {k: results[k] for h in HEADS for k in sorted(results) if k.endswith(f"/{h}")}
    out.write_text(json.dumps(results, indent=1) + "\n")
    for head in HEADS:
        mine = [v for k, v in results.items() if k.endswith(f"/{head}")]
        built = [v for v in mine if v == "ok" or v.startswith("FAIL")]
        ok = sum(v == "ok" for v in built)
        print(f"{head}: tried {len(mine)}, tiny model built {len(built)}, checks pass {ok}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
