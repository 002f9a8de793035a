"""Split a model into ordered units (embedding, one per block, head) and pack them into groups.

The split is found in three layers, the first that applies wins:

1. A user override (:attr:`HiFTConfig.units`): regexes of parameter names per unit.
2. Per-architecture facts in :data:`ARCHITECTURES`, keyed by ``model.config.model_type``, for what a
   walk of the module tree cannot know (e.g. OPT registers its final norm *before* its blocks).
3. A generic method: every stack of blocks (:mod:`.blocks`: an encoder's and a decoder's, a
   vision tower's). One forward pass on a dummy input (:mod:`.trace`) then tells in which order the
   blocks run and where every other parameter is first used: before the first block (the
   ``embed`` unit), between two blocks (a ``between.<i>`` unit, e.g. an encoder's final norm and
   a decoder's position embeddings), or after the last block (``head``). If no forward pass can
   be run, parameters are placed by registration order.

Each unit also records how many blocks provably run before any of its parameters is used
(:attr:`Unit.cut`): backward truncation detaches only those blocks' inputs.

Finally, a unit over :attr:`HiFTConfig.max_unit_params` (by default the largest block) is split
into sub-units and row shards (:mod:`.subunits`); each piece keeps its parent's cut, which stays
correct since its parameters run no earlier than the parent's.

No weights are read or changed, so it works on the ``meta`` device too (the memory estimator
relies on that).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from torch import nn

from ..config import HiFTConfig

# Where the blocks are (and the per-architecture hints) lives in .blocks; its names are
# re-exported here, where callers have always found them.
from .blocks import ARCHITECTURES, ArchitectureHints, find_block_stacks, find_blocks, model_type
from .dummy import input_embeddings

# Units -> groups lives in .groups; its names are re-exported here, where callers have always
# found them next to split_units.
from .groups import balanced_bounds, group_cut, group_name, group_units
from .subunits import split_unit
from .trace import Trace, trace_forward

logger = logging.getLogger(__name__)

__all__ = [
    "ALWAYS",
    "ARCHITECTURES",
    "ArchitectureHints",
    "Unit",
    "always_active_names",
    "balanced_bounds",
    "find_block_stacks",
    "find_blocks",
    "group_cut",
    "group_name",
    "group_units",
    "model_type",
    "split_model",
    "split_units",
    "unit_numel",
]

EMBED = "embed"
HEAD = "head"
#: The name of the unit of :attr:`HiFTConfig.always_active` parameters (see :func:`split_model`).
ALWAYS = "always"


@dataclass(frozen=True)
class Unit:
    """One unit of the model: the smallest piece HiFT trains on its own.

    Attributes:
        name: ``"embed"``, ``"layers.<i>"`` or ``"head"`` (or the user's names with an override);
            a sub-unit adds what it holds, e.g. ``"layers.3.mlp"`` or ``"embed[0:6144]"`` (see
            :mod:`hiftune.engine.split.subunits`).
        params: Names of the unit's trainable parameters, as in ``model.named_parameters()``. A
            sharded parameter appears in several units, each holding some of its rows.
        module: Dotted path of the block the unit lies in (the whole block, or a part of it after
            a split), else ``None``.
        cut: How many blocks (in execution order) run before any parameter of this unit is used:
            their inputs carry no gradient for it, so backward truncation may detach them. 0 (no
            cut) when that is not known, e.g. for the units of an override.
        rows: For each parameter of which the unit holds only some rows (a row shard), those rows
            as ``(start, stop)`` along the first dimension; parameters not listed are whole.
        parent: The name of the unit this one was split from, or ``None``.
    """

    name: str
    params: tuple[str, ...]
    module: str | None = field(default=None)
    cut: int = 0
    rows: Mapping[str, tuple[int, int]] = field(default_factory=dict, hash=False)
    parent: str | None = None

    def part_shape(self, name: str, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of this unit's part of parameter ``name``, whose full shape is ``shape``."""
        rows = self.rows.get(name)
        if rows is None:
            return tuple(shape)
        return (rows[1] - rows[0], *shape[1:])


def unit_numel(unit: Unit, shapes: Mapping[str, Sequence[int]]) -> int:
    """The number of parameters ``unit`` trains (only its rows of a sharded parameter).

    Args:
        unit: The unit.
        shapes: The full shape of each parameter by name, e.g.
            ``{n: p.shape for n, p in model.named_parameters()}``.
    """
    return sum(math.prod(unit.part_shape(n, shapes[n])) for n in unit.params)


def split_units(model: nn.Module, config: HiFTConfig | None = None) -> list[Unit]:
    """Splits ``model`` into its units, bottom-up (embedding first, head last).

    Only trainable parameters (``requires_grad=True``) are placed; a tied parameter is placed once,
    in the embedding unit. Units without trainable parameters are dropped. Units over
    ``config.max_unit_params`` are then split into sub-units and row shards (in place of the unit,
    so the order stays bottom-up); each row of a sharded parameter is in exactly one unit.

    Args:
        model: Any ``nn.Module``; Hugging Face models are recognised by ``config.model_type``.
        config: Supplies the optional ``units`` / ``blocks`` overrides and ``max_unit_params``;
            its ``always_active`` parameters are left out (see :func:`split_model`).

    Returns:
        The non-empty units in bottom-up order.

    Raises:
        ValueError: If the model has no trainable parameters, if no blocks can be found, or if an
            override leaves a parameter unplaced or places one twice.
    """
    return split_model(model, config)[0]


def split_model(
    model: nn.Module, config: HiFTConfig | None = None
) -> tuple[list[Unit], Unit | None]:
    """Splits ``model`` into its rotating units and the unit of its always-active parameters.

    As :func:`split_units`, but the parameters :attr:`HiFTConfig.always_active` names are taken out
    of their units first (before the size budget, so they are never row-sharded) and returned as
    one more unit, :data:`ALWAYS`, whose cut is the lowest of the units they came from (a subset
    of a unit runs no earlier than the unit, so that cut is safe).

    Returns:
        ``(units, always)``: the non-empty rotating units, bottom-up, and the always-active unit
        (``None`` when ``config.always_active`` is empty).

    Raises:
        ValueError: As :func:`split_units`; also if an ``always_active`` pattern matches no
            trainable parameter, or the patterns match every trainable parameter.
    """
    config = config or HiFTConfig()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (all have requires_grad=False); "
            "nothing for HiFT to train."
        )
    first_use: Mapping[str, int] = {}
    if config.units is not None:
        units = _split_by_override([n for n, _ in named], config.units)
    else:
        units, first_use = _split_by_walk(model, named, config.blocks)
    units = [u for u in units if u.params]
    units, always = _carve_always_active(model, units, config.always_active)
    units = _apply_budget(model, units, config.max_unit_params, first_use)
    logger.debug("split %s into %d units", type(model).__name__, len(units))
    return units, always


def always_active_names(model: nn.Module, patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """The trainable parameters ``patterns`` name, and the tied aliases they were named by.

    A pattern is matched in full against every name of a parameter, its aliases included (a tied
    ``lm_head.weight`` is the embedding's parameter); the parameter is then listed once, by the
    name ``model.named_parameters()`` gives it.

    Returns:
        ``(names, aliases)``: the parameters' names in registration order, and each
        ``"alias (= name)"`` that matched where the name itself did not.

    Raises:
        ValueError: If a pattern matches no trainable parameter.
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    compiled = [re.compile(p) for p in patterns]
    chosen: set[str] = set()
    aliases: list[str] = []
    unmatched = set(patterns)
    for name, p in model.named_parameters(remove_duplicate=False):
        hits = {c.pattern for c in compiled if c.fullmatch(name)}
        if not hits or not p.requires_grad:
            continue
        unmatched -= hits
        real = canonical[id(p)]
        if real != name and real not in chosen:
            aliases.append(f"{name} (= {real})")
        chosen.add(real)
    if unmatched:
        raise ValueError(
            f"always_active pattern(s) {sorted(unmatched)} match no trainable parameter of "
            f"{type(model).__name__}; patterns are matched in full against "
            "model.named_parameters() names (e.g. 'classifier\\..*')"
        )
    return [n for n in canonical.values() if n in chosen], aliases


def _carve_always_active(
    model: nn.Module, units: list[Unit], patterns: Sequence[str]
) -> tuple[list[Unit], Unit | None]:
    """Takes the always-active parameters out of ``units``; returns the rest and their unit."""
    if not patterns:
        return units, None
    names, _ = always_active_names(model, patterns)
    chosen = set(names)
    kept: list[Unit] = []
    sources: list[Unit] = []
    for u in units:
        rest = tuple(n for n in u.params if n not in chosen)
        if len(rest) < len(u.params):
            sources.append(u)
        if rest:
            kept.append(replace(u, params=rest) if len(rest) < len(u.params) else u)
    if not kept:
        raise ValueError(
            "always_active matches every trainable parameter: no group is left to rotate "
            "(train such a model with a plain optimizer)"
        )
    modules = {u.module for u in sources}
    module = modules.pop() if len(modules) == 1 else None
    cut = min((u.cut for u in sources), default=0)
    return kept, Unit(ALWAYS, tuple(names), module, cut)


def _apply_budget(
    model: nn.Module,
    units: list[Unit],
    max_unit_params: int | str | None,
    first_use: Mapping[str, int],
) -> list[Unit]:
    """Replaces every unit over the budget by its sub-units (see :mod:`.subunits`)."""
    if max_unit_params is None:
        return units
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if max_unit_params == "auto":
        blocks = [unit_numel(u, shapes) for u in units if u.module is not None]
        if not blocks:
            return units  # no block to measure by (a units override): the split stays
        budget = max(blocks)
    else:
        budget = int(max_unit_params)
    out: list[Unit] = []
    for u in units:
        parts = split_unit(model, u.params, u.module, budget, first_use)
        if len(parts) == 1:
            out.append(u)
            continue
        out += [
            replace(u, name=f"{u.name}{s.suffix}", params=s.params, rows=s.rows, parent=u.name)
            for s in parts
        ]
    return out


def _input_embedding_ids(model: nn.Module) -> set[int]:
    embedding = input_embeddings(model)
    return set() if embedding is None else {id(p) for p in embedding.parameters()}


def _split_by_walk(
    model: nn.Module, named: list[tuple[str, nn.Parameter]], blocks_path: str | None
) -> tuple[list[Unit], Mapping[str, int]]:
    """The generic split, with each parameter's first use in the traced pass (empty without)."""
    block_paths = [p for stack in find_block_stacks(model, blocks_path) for p in stack]
    owner: dict[int, str] = {}  # id(param) -> path of the block that holds it
    for path in block_paths:
        for p in model.get_submodule(path).parameters():
            owner.setdefault(id(p), path)
    trace = trace_forward(model, block_paths)
    if trace is None:
        return _split_by_registration(model, named, block_paths, owner), {}
    hints = ARCHITECTURES.get(model_type(model) or "", ArchitectureHints())
    embed_ids = _input_embedding_ids(model)
    order = trace.blocks
    index = {path: i for i, path in enumerate(order)}
    n = len(order)
    blocks: list[list[str]] = [[] for _ in order]
    gaps: list[list[str]] = [[] for _ in range(n + 1)]  # gaps[s]: used after s blocks started
    seen_block = False
    for name, p in named:
        block = owner.get(id(p))
        if block is not None:
            blocks[index[block]].append(name)
            seen_block = True
        elif id(p) in embed_ids or any(re.search(r, name) for r in hints.embed):
            gaps[0].append(name)
        elif any(re.search(r, name) for r in hints.head):
            gaps[n].append(name)
        elif name in trace.first_use:
            used = trace.first_use[name]
            gaps[sum(trace.first_start[b] < used for b in order)].append(name)
        else:  # not used by the dummy forward pass: where it is registered
            gaps[n if seen_block else 0].append(name)

    def unit(name: str, params: list[str], module: str | None = None) -> Unit:
        return Unit(name, tuple(params), module, _cut(trace, params, owner, named))

    units = [unit(EMBED, gaps[0])]
    for i, path in enumerate(order):
        units.append(unit(f"layers.{i}", blocks[i], path))
        if i + 1 < n:
            units.append(unit(f"between.{i + 1}", gaps[i + 1]))
    units.append(unit(HEAD, gaps[n]))
    return units, trace.first_use


def _cut(
    trace: Trace, params: list[str], owner: dict[int, str], named: list[tuple[str, nn.Parameter]]
) -> int:
    """How many blocks, in execution order, provably run before any of ``params`` is used."""
    if not params:
        return 0
    by_name = dict(named)
    uses = []
    for name in params:
        used = trace.first_use.get(name)
        if used is None:
            path = owner.get(id(by_name[name]))
            if path is None:
                return 0  # never seen in use: nothing is provably safe to cut
            # A block's parameter the dummy pass did not reach (an expert no token was routed
            # to) runs inside its block, so no earlier than just after the block starts.
            used = trace.first_start[path] + 1
        uses.append(used)
    first = min(uses)
    cut = 0
    # Every call of a block must start before the first use: a block called again later (a
    # shared block) may carry a gradient path then.
    while cut < len(trace.blocks) and trace.last_start[trace.blocks[cut]] < first:
        cut += 1
    return cut


def _split_by_registration(
    model: nn.Module,
    named: list[tuple[str, nn.Parameter]],
    block_paths: list[str],
    owner: dict[int, str],
) -> list[Unit]:
    """The split without a forward pass: non-block parameters placed by registration order.

    Only block units get a cut (their parameters run inside them); the embedding and head units
    get none, since where their parameters run is not known.
    """
    hints = ARCHITECTURES.get(model_type(model) or "", ArchitectureHints())
    embed_ids = _input_embedding_ids(model)
    index = {path: i for i, path in enumerate(block_paths)}
    embed: list[str] = []
    head: list[str] = []
    blocks: list[list[str]] = [[] for _ in block_paths]
    seen_block = False
    for name, p in named:
        if id(p) in owner:
            blocks[index[owner[id(p)]]].append(name)
            seen_block = True
        elif id(p) in embed_ids or any(re.search(r, name) for r in hints.embed):
            embed.append(name)
        elif any(re.search(r, name) for r in hints.head) or seen_block:
            head.append(name)
        else:
            embed.append(name)
    return [
        Unit(EMBED, tuple(embed)),
        *(Unit(f"layers.{i}", tuple(b), block_paths[i], i + 1) for i, b in enumerate(blocks)),
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
