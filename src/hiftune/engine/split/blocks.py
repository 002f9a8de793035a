"""Where a model's blocks are: per-architecture hints as data, and a generic search.

:mod:`.units` splits a model into units around its blocks; this module finds them. The blocks are
the longest run of consecutive sibling modules of one class (a ``ModuleList`` of decoder layers, or
a run inside an ``nn.Sequential``; a layer alone in a ``ModuleList``, such as ALBERT's one shared
layer, if no model layer has a sibling of its class), plus every other stack of blocks
(``_no_split_modules`` classes, the same class or container name, or a whole ``ModuleList`` of
layers of one class): an encoder's and a decoder's, a vision tower's or a speech encoder's.
What a walk of the module tree cannot know is data in :data:`ARCHITECTURES`, keyed by
``config.model_type``. No weights are read, so it works on the ``meta`` device too.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["ARCHITECTURES", "ArchitectureHints", "find_block_stacks", "find_blocks", "model_type"]


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


def model_type(model: nn.Module) -> str | None:
    """The Hugging Face ``config.model_type`` of ``model``, if it has one."""
    return getattr(getattr(model, "config", None), "model_type", None)


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, list[str]]:
    """Finds the main stack of transformer blocks of ``model``.

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
    runs = _candidate_runs(model)
    if not runs:
        children = ", ".join(f"{n} ({type(c).__name__})" for n, c in model.named_children())
        raise ValueError(
            f"hiftune could not find the transformer blocks of {type(model).__name__}: no module "
            f"holds two or more consecutive submodules of one class with parameters (top-level "
            f"modules: {children or 'none'}). Name the block container with "
            "HiFTConfig(blocks='path.to.blocks'), or give the whole split with "
            "HiFTConfig(units={'embed': [r'embed\\..*'], 'layers.0': [...], ..., 'head': [...]})."
        )
    best = max(runs, key=lambda r: r.score)  # max() keeps the first of equal scores
    return best.container, list(best.paths)


def find_block_stacks(model: nn.Module, path: str | None = None) -> list[list[str]]:
    """Finds every stack of blocks of ``model``, in registration order.

    The main stack is :func:`find_blocks`'s. Other stacks are further runs of two or more blocks
    of a class listed in ``model._no_split_modules``, or of the main stack's class or in a
    container of the same name (unless the blocks are single layers such as ``nn.Linear``),
    outside the stacks already found: a decoder's blocks beside an encoder's.

    Args:
        model: The model.
        path: Dotted path of the one block container (no other stacks are searched then).

    Returns:
        The block paths of each stack.
    """
    container, main = find_blocks(model, path)
    hints = ARCHITECTURES.get(model_type(model) or "")
    if path is not None or (hints is not None and hints.blocks is not None):
        return [main]
    runs = _candidate_runs(model)
    main_run = next(r for r in runs if r.container == container and list(r.paths) == main)
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    chosen = [main_run]
    for run in sorted(runs, key=lambda r: r.score, reverse=True):
        # Layers (not single Linear modules) of the main stack's class or in a container of the
        # same name (``encoder.layers`` / ``decoder.layers`` of two layer classes).
        alike = (
            main_run.score[0]
            and run.score[0]
            and (run.cls == main_run.cls or _last(run.container) == _last(main_run.container))
        )
        # Or a whole ModuleList of layers of one class, whatever its name: a vision tower's or
        # a speech encoder's layers beside a text decoder's of another class.
        listed = run.score[0] and run.whole_list
        if len(run.paths) < 2 or not (run.cls in no_split or alike or listed):
            continue
        if any(_overlaps(run, other) for other in chosen):
            continue
        chosen.append(run)
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    chosen.sort(key=lambda r: position[r.paths[0]])
    return [list(r.paths) for r in chosen]


@dataclass(frozen=True)
class _Run:
    container: str
    paths: tuple[str, ...]
    cls: str
    score: tuple[bool, bool, bool, int]  # nested, two or more, in _no_split_modules, length
    #: The run is the whole of a ``ModuleList`` (every child with parameters).
    whole_list: bool = False


def _candidate_runs(model: nn.Module) -> list[_Run]:
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    found = []
    for prefix, module in model.named_modules():
        for run in _runs_of_same_class(module):
            cls_name = type(run[0][1]).__name__
            nested = any(True for _ in run[0][1].children())
            # A lone layer in a ModuleList is a stack of one block: ALBERT keeps its one shared
            # layer there and calls it at every depth. Without this, the best run would be one
            # of leaves inside that layer (its q/k/v/dense projections), each taken for a block.
            lone_layer = nested and isinstance(module, nn.ModuleList)
            if len(run) < 2 and not (lone_layer or cls_name in no_split):
                continue
            paths = tuple(f"{prefix}.{name}" if prefix else name for name, _ in run)
            # Blocks have submodules: a run of leaves (the q/k/v/o projections inside one
            # block, the word/position/type embeddings) loses to a run of layers of any length,
            # and a lone module named in _no_split_modules (an embeddings or self-attention
            # module some models list there) or alone in a ModuleList to a run of two or more
            # layers.
            score = (nested, len(run) >= 2, cls_name in no_split, len(run))
            whole = isinstance(module, nn.ModuleList) and len(run) == sum(
                _has_params(c) for c in module.children()
            )
            found.append(_Run(prefix, paths, cls_name, score, whole))
        mixed = _mixed_layers(prefix, module, no_split)
        if mixed is not None:
            found.append(mixed)
    return found


def _mixed_layers(prefix: str, module: nn.Module, no_split: set[str]) -> _Run | None:
    """A ``ModuleList`` of layers of several classes (a hybrid model's attention and Mamba or
    linear-attention layers), as one run: split by class, each run would hold a few layers."""
    children = [(n, c) for n, c in module.named_children() if _has_params(c)]
    classes = {type(c).__name__ for _, c in children}
    if not isinstance(module, nn.ModuleList) or len(children) < 2 or len(classes) < 2:
        return None
    if not all(any(True for _ in c.children()) for _, c in children):
        return None
    paths = tuple(f"{prefix}.{name}" if prefix else name for name, _ in children)
    score = (True, True, bool(classes & no_split), len(paths))
    return _Run(prefix, paths, "+".join(sorted(classes)), score)


def _last(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _overlaps(a: _Run, b: _Run) -> bool:
    # One run nested in a block of the other (experts inside a layer), or the same modules.
    return any(
        x == y or x.startswith(y + ".") or y.startswith(x + ".") for x in a.paths for y in b.paths
    )


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
