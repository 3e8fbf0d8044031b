"""The logical state dict ⇄ the megatron-core chunks of the adapter's model, at any TP/PP/VPP.

"Logical" means InternEvo's tp=1, pp=1 state dict of the model's family: its key names, global layer
numbers and its own fused (or separate) qkv (``adapter.families``). Both sides are tensor tables
(``adapter.weights``), so this module only says which units a chunk holds and how its layers are numbered;
the tables do the slicing, concatenation and row reordering, bit-exact in both directions.
"""

from __future__ import annotations

from typing import Callable, Container, Iterator, Mapping, Optional

import torch

from adapter.config.schema import ModelConfig
from adapter.families import logical_table
from adapter.runtime.layout import ParallelLayout
from adapter.weights import atoms
from adapter.weights.mcore import TE_NAMES, local_spec_name, mcore_table
from adapter.weights.table import Unit, whole_shape, whole_unit

__all__ = ["TE_NAMES", "local_spec_name", "logical_shapes", "logical_keys", "model_units", "chunk_units",
           "chunk_pieces", "chunk_state_dict", "expected_chunk", "logical_from_chunk", "mcore_unit", "model_state"]


def logical_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the logical state dict with its shape, in InternEvo's file order."""
    return {key: whole_shape(model, stored) for key, stored in logical_table(model).all_keys(model)}


def logical_keys(model: ModelConfig) -> list[str]:
    """Every key of the logical state dict, in InternEvo's file order."""
    return [key for key, _ in logical_table(model).all_keys(model)]


def model_units(model: ModelConfig) -> list[list[str]]:
    """The logical keys of each unit, in model order: embedding, layer 0 … layer L-1, final norm and head."""
    table = logical_table(model)
    return [[key for key, _ in table.keys(model, u)] for u in range(atoms.num_units(model))]


def chunk_units(model: ModelConfig, layout: ParallelLayout, pp_rank: int, vp_stage: int) -> list[tuple[int, int]]:
    """``(unit, local layer number)`` of the units chunk ``vp_stage`` of stage ``pp_rank`` holds, in order."""
    start, end = layout.stages[pp_rank][vp_stage]
    units = [(0, 0)] if pp_rank == 0 and vp_stage == 0 else []
    units += [(1 + i, i - start) for i in range(start, end)]
    if pp_rank == layout.pp - 1 and vp_stage == layout.vpp - 1:
        units.append((model.num_layers + 1, 0))
    return units


def chunk_state_dict(logical: Mapping[str, torch.Tensor], model: ModelConfig, layout: ParallelLayout,
                     pp_rank: int, vp_stage: int, tp_rank: int,
                     keys: Optional[Container[str]] = None) -> dict[str, torch.Tensor]:
    """The megatron-core state dict of chunk ``vp_stage`` on pipeline rank ``pp_rank``, tensor rank ``tp_rank``
    (with ``keys``, only those entries). Only the logical tensors those entries need are read; pieces that
    are plain slices stay views of them. A source that reads its files piece by piece (``sliced_unit(i)``, the
    InternEvo reader's) is read only where this rank's rows lie."""
    return dict(chunk_pieces(logical, model, layout, pp_rank, vp_stage, tp_rank, keys))


def chunk_pieces(logical: Mapping[str, torch.Tensor], model: ModelConfig, layout: ParallelLayout,
                 pp_rank: int, vp_stage: int, tp_rank: int, keys: Optional[Container[str]] = None,
                 into: Optional[Callable[[str], Optional[torch.Tensor]]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``chunk_state_dict``'s entries one at a time, in the table's order: a reader that uses each and lets
    it go holds one tensor (and its unit's pieces), not the chunk. ``into(key)``: memory of the entry's shape
    that an entry joined from several pieces is joined into (``Unit.piece``), or None."""
    by_piece = getattr(logical, "sliced_unit", None)
    for unit, local in chunk_units(model, layout, pp_rank, vp_stage):
        source = (by_piece and by_piece(unit)) or whole_unit(model, unit, logical_table(model), logical.__getitem__)
        for key, _, piece in source.convert(mcore_table(model), layout.tp, tp_rank, local, only=keys, into=into):
            yield key, piece


def expected_chunk(model: ModelConfig, layout: ParallelLayout, pp_rank: int, vp_stage: int,
                   tp_rank: int) -> dict[str, torch.Tensor]:
    """``chunk_state_dict`` from the model's sizes alone: every tensor as a ``meta`` tensor (fp32)."""
    logical = {k: torch.empty(s, device="meta") for k, s in logical_shapes(model).items()}
    return chunk_state_dict(logical, model, layout, pp_rank, vp_stage, tp_rank)


def logical_from_chunk(shards: list[Mapping[str, torch.Tensor]], model: ModelConfig, layout: ParallelLayout,
                       pp_rank: int, vp_stage: int) -> dict[str, torch.Tensor]:
    """Inverse of ``chunk_state_dict``: the logical tensors held by one chunk, from all its tensor ranks."""
    out: dict[str, torch.Tensor] = {}
    for unit, local in chunk_units(model, layout, pp_rank, vp_stage):
        source = Unit(model, unit, mcore_table(model), layout.tp,
                            lambda stored, key: [shards[r][key] for r in stored.holders(layout.tp)], local)
        out.update((key, piece) for key, _, piece in source.convert(logical_table(model), 1, 0))
    return out


def mcore_unit(model: ModelConfig, name: str, first_layer: int) -> int:
    """The unit of a chunk's megatron-core key, the chunk's layers starting at global layer ``first_layer``."""
    stored, layer = mcore_table(model).find(name)
    return atoms.unit_of(model, stored.atoms[0], None if layer is None else first_layer + layer)


def model_state(chunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A chunk's parameters by megatron-core name (no ``_extra_state`` entries)."""
    return {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}
