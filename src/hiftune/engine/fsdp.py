"""HiFT over FSDP2: models whose blocks are sharded with ``torch.distributed.fsdp.fully_shard``.

FSDP2 turns every parameter of a sharded module into a ``DTensor`` (each rank holds a slice along
dim 0), all-gathers a module's parameters around its forward and backward, and reduce-scatters the
gradients of the parameters that received one. HiFT composes with that without special cases in
the optimizer:

* only the active group requires grad, so backward produces (and FSDP2 reduce-scatters) gradients
  for the active group only, already averaged over ranks (HiFT's own all-reduce skips ``DTensor``
  parameters, see :mod:`.distributed`);
* the user's optimizer steps on the active group's local shards (torch optimizers accept
  ``DTensor`` parameters), so its state is sharded the same way;
* the paged state of inactive groups is stored as local shards (:mod:`.state.paging`), so each rank's
  host or disk holds ``1/N`` of it.

One thing must happen before sharding: the unit split. HiFT traces a forward pass on a ``meta``
copy of the model to place parameters, and an FSDP2 module can be neither deep-copied nor safely
run outside its own training loop. :func:`pin_units` splits the unsharded model and writes the split
into the config (``HiFTConfig.units``); :func:`shard_by_units` also shards each block unit and
the root, so that every FSDP2 communication group is one HiFT unit (or the root's leftovers).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import nn

from .config import HiFTConfig
from .distributed import is_sharded
from .split.units import Unit, split_units

__all__ = ["pin_units", "shard_by_units"]


def pin_units(model: nn.Module, config: HiFTConfig | None = None) -> HiFTConfig:
    """``config`` with ``model``'s unit split written out, to build HiFT after sharding.

    Call it on the model *before* ``fully_shard`` (sharding keeps the parameter names, so the
    pinned split still names every parameter afterwards).

    Args:
        model: The unsharded model.
        config: The HiFT configuration; its ``units`` / ``blocks`` overrides are honoured.

    Returns:
        A copy of ``config`` whose ``units`` names each unit's parameters exactly (and
        ``blocks=None``). Units from an override have no backward-truncation cut, which matters only
        with gradient checkpointing (see ``docs/distributed.md``). A parameter is never split into
        row shards (FSDP2 shards its rows over the ranks): with the default
        ``max_unit_params="auto"``, a model whose split would need them is split without sub-units.

    Raises:
        ValueError: If the model is sharded already (split it before ``fully_shard``), an
            explicit ``max_unit_params`` splits a parameter into row shards, ``precision`` is
            not ``"fp32"``, or ``shard_state`` is on.
    """
    config = config if config is not None else HiFTConfig()
    return _pinned(config, fsdp_units(model, config))


def shard_by_units(
    model: nn.Module,
    config: HiFTConfig | None = None,
    **fully_shard_kwargs: Any,
) -> HiFTConfig:
    """Shards ``model`` with FSDP2 one HiFT unit at a time, and returns the config to train it with.

    Every block unit's module becomes its own FSDP2 module, then the root takes the rest (the
    embedding and head units), so that a step all-gathers and reduce-scatters only what it needs.

    Args:
        model: The unsharded model, on the device it trains on (``fully_shard`` shards in place).
        config: The HiFT configuration.
        **fully_shard_kwargs: Passed to every ``fully_shard`` call (``mesh``,
            ``reshard_after_forward``, ...).

    Returns:
        The config for :class:`~hiftune.engine.optimizer.HiFTOptimizer` (see :func:`pin_units`).
    """
    from torch.distributed.fsdp import fully_shard

    config = config if config is not None else HiFTConfig()
    units = fsdp_units(model, config)
    # A block split into several units (sub-units) is still one FSDP2 module.
    for path in dict.fromkeys(u.module for u in units if u.module is not None):
        fully_shard(model.get_submodule(path), **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return _pinned(config, units)


def fsdp_units(model: nn.Module, config: HiFTConfig) -> list[Unit]:
    """The units HiFT trains over FSDP2: :func:`split_units`, without row shards.

    Raises:
        ValueError: For ``shard_state``, half precision, a model sharded already, or an explicit
            ``max_unit_params`` that would split a parameter into row shards.
    """
    if config.shard_state:
        raise ValueError(
            "shard_state=True shards the optimizer state of a replicated model; with FSDP2 every "
            "rank already keeps only its shards of the state: leave shard_state off"
        )
    if config.precision != "fp32":
        # HiFT's mixed precision casts parameters FSDP2 owns; FSDP2's own MixedPrecisionPolicy
        # fails (torch 2.13) once requires_grad moves to another group between steps.
        raise ValueError(
            f"HiFT over FSDP2 trains in precision='fp32' only, not {config.precision!r}"
        )
    if any(is_sharded(p) for p in model.parameters()):
        raise ValueError(
            f"{type(model).__name__} is sharded already: call pin_units (or shard_by_units) on the "
            "model before fully_shard, since HiFT traces the unsharded model to find its units"
        )
    units = split_units(model, config)
    if any(u.rows for u in units) and config.max_unit_params == "auto":
        # FSDP2 shards every parameter's rows over the ranks already; HiFT's own row shards would
        # cut across them. The default budget gives way (no sub-units at all then).
        units = split_units(model, dataclasses.replace(config, max_unit_params=None))
    split = [u.name for u in units if u.rows]
    if split:
        raise ValueError(
            f"units {split} hold some rows of a parameter (max_unit_params); with FSDP2 a "
            "parameter must belong to one unit: raise max_unit_params or leave it unset"
        )
    return units


def _pinned(config: HiFTConfig, units: list[Unit]) -> HiFTConfig:
    return dataclasses.replace(
        config,
        units={u.name: [re.escape(n) for n in u.params] for u in units},
        blocks=None,
    )
