"""The layering contract: each layer imports only from the layers below it.

    cli/                      (top: nothing imports it)
    recipes/
    memory/   integrations/   (siblings: neither imports the other)
    engine/                   (no transformers, nothing above)
    errors                    (the user-error type; imports nothing)

Checked two ways: statically, every import statement in ``src/hiftune`` (including the ones inside
functions) against the layer table; and dynamically, by importing each layer in a fresh
interpreter and looking at ``sys.modules``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "hiftune"

#: Layer of each top-level part of the package; a module may import its own layer and below.
LAYERS = {
    "errors": 0,
    "engine": 1,
    "memory": 2,
    "integrations": 2,
    "recipes": 3,
    "cli": 4,
    "__main__": 5,  # `python -m hiftune`: the CLI's entry point
}
#: Third-party packages the engine must never import, not even inside a function. (tqdm is not
#: here: torch itself imports it.)
ENGINE_FORBIDDEN = ("transformers", "trl", "accelerate", "datasets", "matplotlib", "yaml")


def _part(module: str) -> str:
    """``hiftune.engine.split.units`` -> ``engine``; ``hiftune`` -> ``""`` (the package's face)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, as absolute names, with line numbers."""
    rel = path.relative_to(SRC.parent).with_suffix("")
    package = list(rel.parts[:-1])  # the package a relative import starts from
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # `from . import data` names a module, not an attribute.
            found += [(node.lineno, f"{name}.{a.name}") for a in node.names]
    return found


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_module_has_a_layer():
    for path in _modules():
        module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
        part = _part(module)
        if part in ("", "__init__"):
            continue
        assert part in LAYERS, f"{module} is in no layer: add {part!r} to LAYERS"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_down_only(path: Path):
    module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    part = _part(module)
    if part == "__init__":  # hiftune/__init__.py: the public API, re-exported from the engine
        part = "engine"
    own = LAYERS[part]
    for line, name in _imports(path):
        root = name.split(".")[0]
        if part in ("engine", "errors"):
            assert root not in ENGINE_FORBIDDEN, f"{path}:{line}: the engine imports {name}"
        if root != "hiftune":
            continue
        target = _part(name)
        if target in ("", "__version__") or target not in LAYERS:
            # `hiftune` itself is the engine's public face; names below it that are not
            # sub-packages are attributes of hiftune/__init__.py.
            target = "engine"
        if target == part:
            continue
        assert LAYERS[target] < own, (
            f"{path}:{line}: {module} ({part}, layer {own}) imports {name} "
            f"({target}, layer {LAYERS[target]}); imports must go down the layers"
        )


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return set(out.split())


def test_importing_the_library_loads_no_hugging_face_stack():
    loaded = _loaded_after("import hiftune, hiftune.engine.optimizer, hiftune.engine.optimizers")
    heavy = sorted(m for m in loaded if m.split(".")[0] in ENGINE_FORBIDDEN)
    assert not heavy, f"import hiftune loads {heavy[:5]}"
    assert not any(m.startswith(("hiftune.cli", "hiftune.recipes")) for m in loaded)


@pytest.mark.parametrize("layer", ["memory", "integrations", "recipes"])
def test_no_layer_loads_the_cli(layer: str):
    modules = [
        ".".join(p.relative_to(SRC.parent).with_suffix("").parts)
        for p in (SRC / layer).glob("*.py")
    ]
    loaded = _loaded_after("; ".join(f"import {m}" for m in modules))
    assert not any(m.startswith("hiftune.cli") for m in loaded)


def test_importing_the_recipes_leaves_the_environment_alone():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; os.environ.pop('HF_HUB_OFFLINE', None); "
            "import hiftune.recipes.train; print(os.environ.get('HF_HUB_OFFLINE'))",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert out.strip() == "None"
