"""Split a model into ordered units (embedding, one per block, head) and pack them into groups.

The split is found in three layers, the first that applies wins:

1. A user override (:attr:`HiFTConfig.units`): regexes of parameter names per unit.
2. Per-architecture facts in :data:`ARCHITECTURES`, keyed by ``model.config.model_type``, for what a
   walk of the module tree cannot know (e.g. OPT registers its final norm *before* its blocks).
3. A generic walk: the blocks are the longest run of consecutive sibling modules of one class (a
   ``ModuleList`` of decoder layers, or a run inside an ``nn.Sequential``); parameters registered
   before the first block form the embedding unit, those after the last block the head unit.

Everything here is a pure function of the model's structure: no weights are read, so it works on
the ``meta`` device too (the memory estimator relies on that).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from .config import HiFTConfig

logger = logging.getLogger(__name__)

EMBED = "embed"
HEAD = "head"


@dataclass(frozen=True)
class ArchitectureHints:
    """What the generic walk needs to be told about one architecture.

    Attributes:
        blocks: Dotted path of the block container, when the longest run of identical modules is
            not the right one.
        embed: Regexes (searched in parameter names) of non-block parameters that belong to the
            embedding unit wherever they are registered.
        head: Regexes of non-block parameters that belong to the head unit wherever they are
            registered.
    """

    blocks: str | None = None
    embed: tuple[str, ...] = ()
    head: tuple[str, ...] = ()


#: Per-architecture facts, keyed by ``config.model_type``. Only what the walk gets wrong is here.
ARCHITECTURES: dict[str, ArchitectureHints] = {
    # OPTDecoder registers final_layer_norm and project_out before its layers, but both run after
    # the last block.
    "opt": ArchitectureHints(head=(r"(^|\.)final_layer_norm\.", r"(^|\.)project_out\.")),
}


@dataclass(frozen=True)
class Unit:
    """One unit of the model: the smallest piece HiFT trains on its own.

    Attributes:
        name: ``"embed"``, ``"layers.<i>"`` or ``"head"`` (or the user's names with an override).
        params: Names of the unit's trainable parameters, as in ``model.named_parameters()``.
        module: Dotted path of the block module for block units, else ``None``.
    """

    name: str
    params: tuple[str, ...]
    module: str | None = field(default=None)


def split_units(model: nn.Module, config: HiFTConfig | None = None) -> list[Unit]:
    """Splits ``model`` into its units, bottom-up (embedding first, head last).

    Only trainable parameters (``requires_grad=True``) are placed; a tied parameter is placed once,
    in the embedding unit. Units without trainable parameters are dropped.

    Args:
        model: Any ``nn.Module``; Hugging Face models are recognised by ``config.model_type``.
        config: Supplies the optional ``units`` / ``blocks`` overrides.

    Returns:
        The non-empty units in bottom-up order.

    Raises:
        ValueError: If the model has no trainable parameters, if no blocks can be found, or if an
            override leaves a parameter unplaced or places one twice.
    """
    config = config or HiFTConfig()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (all have requires_grad=False); "
            "nothing for HiFT to train."
        )
    if config.units is not None:
        units = _split_by_override([n for n, _ in named], config.units)
    else:
        units = _split_by_walk(model, named, config.blocks)
    units = [u for u in units if u.params]
    logger.debug("split %s into %d units", type(model).__name__, len(units))
    return units


def group_units(units: Sequence[Unit], units_per_group: int) -> list[tuple[Unit, ...]]:
    """Packs consecutive units into ``ceil(n / m)`` groups of ``m`` (the last may hold fewer).

    Raises:
        ValueError: If ``units_per_group`` is below 1 or above the number of units.
    """
    n = len(units)
    if not 1 <= units_per_group <= n:
        raise ValueError(
            f"units_per_group must be between 1 and the number of units n={n} of this model, "
            f"got {units_per_group}"
        )
    k = math.ceil(n / units_per_group)
    return [tuple(units[i * units_per_group : (i + 1) * units_per_group]) for i in range(k)]


def group_name(units: Sequence[Unit]) -> str:
    """A readable name for a group: ``"layers.3"`` or ``"layers.2..layers.4"``."""
    return units[0].name if len(units) == 1 else f"{units[0].name}..{units[-1].name}"


def model_type(model: nn.Module) -> str | None:
    """The Hugging Face ``config.model_type`` of ``model``, if it has one."""
    return getattr(getattr(model, "config", None), "model_type", None)


# --- the generic walk ---------------------------------------------------------------------------


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, list[str]]:
    """Finds the transformer blocks of ``model``.

    Args:
        model: The model.
        path: Dotted path of the block container; ``None`` searches for it.

    Returns:
        ``(container_path, block_paths)``: the dotted paths of the container and of each block.

    Raises:
        ValueError: If ``path`` names no module, or no run of two or more blocks is found.
    """
    hints = ARCHITECTURES.get(model_type(model) or "")
    path = path or (hints.blocks if hints else None)
    if path is not None:
        try:
            container = model.get_submodule(path)
        except AttributeError:
            raise ValueError(
                f"blocks={path!r} names no submodule of {type(model).__name__}"
            ) from None
        blocks = [
            f"{path}.{name}" for name, child in container.named_children() if _has_params(child)
        ]
        if not blocks:
            raise ValueError(f"blocks={path!r} holds no submodules with parameters")
        return path, blocks

    no_split = set(getattr(model, "_no_split_modules", None) or ())
    best: tuple[tuple[bool, int], str, list[str]] | None = None
    for prefix, module in model.named_modules():
        for run in _runs_of_same_class(module):
            cls_name = type(run[0][1]).__name__
            score = (cls_name in no_split, len(run))
            if len(run) < 2 and cls_name not in no_split:
                continue
            if best is None or score > best[0]:
                paths = [f"{prefix}.{name}" if prefix else name for name, _ in run]
                best = (score, prefix, paths)
    if best is None:
        children = ", ".join(f"{n} ({type(c).__name__})" for n, c in model.named_children())
        raise ValueError(
            f"hiftune could not find the transformer blocks of {type(model).__name__}: no module "
            f"holds two or more consecutive submodules of one class with parameters (top-level "
            f"modules: {children or 'none'}). Name the block container with "
            "HiFTConfig(blocks='path.to.blocks'), or give the whole split with "
            "HiFTConfig(units={'embed': [r'embed\\..*'], 'layers.0': [...], ..., 'head': [...]})."
        )
    return best[1], best[2]


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _runs_of_same_class(module: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """Maximal runs of consecutive children of one class that have parameters."""
    runs: list[list[tuple[str, nn.Module]]] = []
    for name, child in module.named_children():
        if not _has_params(child):
            continue
        if runs and type(runs[-1][-1][1]) is type(child):
            runs[-1].append((name, child))
        else:
            runs.append([(name, child)])
    return runs


def _split_by_walk(
    model: nn.Module, named: list[tuple[str, nn.Parameter]], blocks_path: str | None
) -> list[Unit]:
    _, block_paths = find_blocks(model, blocks_path)
    hints = ARCHITECTURES.get(model_type(model) or "", ArchitectureHints())

    unit_of: dict[int, int] = {}  # id(param) -> index into block_paths
    for i, path in enumerate(block_paths):
        for p in model.get_submodule(path).parameters():
            unit_of[id(p)] = i
    # The input embeddings always open the model, wherever they are registered.
    embed_ids: set[int] = set()
    get_inputs = getattr(model, "get_input_embeddings", None)
    if callable(get_inputs):
        try:
            emb = get_inputs()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Module):
            embed_ids = {id(p) for p in emb.parameters()}

    embed: list[str] = []
    head: list[str] = []
    blocks: list[list[str]] = [[] for _ in block_paths]
    seen_block = False
    for name, p in named:
        if id(p) in unit_of:
            blocks[unit_of[id(p)]].append(name)
            seen_block = True
        elif id(p) in embed_ids or any(re.search(r, name) for r in hints.embed):
            embed.append(name)
        elif any(re.search(r, name) for r in hints.head) or seen_block:
            head.append(name)
        else:
            embed.append(name)
    return [
        Unit(EMBED, tuple(embed)),
        *(Unit(f"layers.{i}", tuple(b), block_paths[i]) for i, b in enumerate(blocks)),
        Unit(HEAD, tuple(head)),
    ]


def _split_by_override(names: list[str], units: Mapping[str, Sequence[str]]) -> list[Unit]:
    compiled: dict[str, list[re.Pattern[str]]] = {}
    for unit, patterns in units.items():
        try:
            compiled[unit] = [re.compile(p) for p in patterns]
        except re.error as e:
            raise ValueError(f"units[{unit!r}] has an invalid regex: {e}") from None
    placed: dict[str, list[str]] = {u: [] for u in units}
    unplaced: list[str] = []
    twice: list[str] = []
    for name in names:
        hits = [u for u, pats in compiled.items() if any(p.fullmatch(name) for p in pats)]
        if not hits:
            unplaced.append(name)
        elif len(hits) > 1:
            twice.append(f"{name} (in {', '.join(hits)})")
        else:
            placed[hits[0]].append(name)
    if unplaced:
        raise ValueError(
            f"the units override leaves {len(unplaced)} trainable parameter(s) in no unit: "
            f"{_preview(unplaced)}. Add them to a unit, or freeze them (requires_grad=False)."
        )
    if twice:
        raise ValueError(
            f"the units override places {len(twice)} parameter(s) in more than one unit: "
            f"{_preview(twice)}"
        )
    empty = [u for u, ps in placed.items() if not ps]
    if empty:
        raise ValueError(f"the units override has units that match no parameter: {empty}")
    return [Unit(u, tuple(ps)) for u, ps in placed.items()]


def _preview(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
