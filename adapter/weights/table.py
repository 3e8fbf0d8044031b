"""A format's tensor table, and the one conversion every reader and writer uses: a unit's stored tensors in
one table (at one tensor-parallel size) → another table's pieces for one rank.

A ``Table`` lists a format's ``Stored`` tensors outside and inside a layer, in file order. Tables are
built per model (``Table.of``), keeping only tensors whose atoms the model has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Container, Iterator, Optional, Sequence

import torch

from adapter.config.schema import ModelConfig
from adapter.weights import atoms as A
from adapter.weights.stored import Stored, check_pieces, concat, split_sizes


@dataclass(frozen=True)
class Table:
    embedding: tuple[Stored, ...]
    layer: tuple[Stored, ...]
    """Per-layer tensors; their names hold ``{i}``."""
    final: tuple[Stored, ...]

    @classmethod
    def of(cls, model: ModelConfig, embedding: Sequence[Stored], layer: Sequence[Stored],
           final: Sequence[Stored]) -> "Table":
        """The table of the tensors this model has; fused tensors get their atoms' row counts."""
        def keep(rows: Sequence[Stored]) -> tuple[Stored, ...]:
            out = []
            for s in rows:
                if all(A.present(model, a) for a in s.atoms):
                    out.append(Stored(s.name, s.atoms, s.split, s.blocks, A.rows(model, s.atoms)) if s.fused else s)
            return tuple(out)

        return cls(keep(embedding), keep(layer), keep(final))

    def unit(self, model: ModelConfig, unit: int) -> tuple[Stored, ...]:
        """The stored tensors of ``unit`` (0 embedding, ``1 + i`` layer ``i``, ``L + 1`` final)."""
        if unit == 0:
            return self.embedding
        return self.final if unit == A.num_units(model) - 1 else self.layer

    def keys(self, model: ModelConfig, unit: int, layer_name: Optional[int] = None) -> list[tuple[str, Stored]]:
        """``(key, stored)`` of a unit, the layer numbered ``layer_name`` (default: its global index)."""
        i = unit - 1 if layer_name is None else layer_name
        return [(s.name.format(i=i), s) for s in self.unit(model, unit)]

    def all_keys(self, model: ModelConfig) -> list[tuple[str, Stored]]:
        """Every key with global layer numbers, unit by unit."""
        return [kv for u in range(A.num_units(model)) for kv in self.keys(model, u)]

    def find(self, key: str) -> Optional[tuple[Stored, Optional[int]]]:
        """The row a key matches, with its layer number (None outside the layers)."""
        for s in self.embedding + self.final:
            if key == s.name:
                return s, None
        for s in self.layer:
            m = _pattern(s.name).match(key)
            if m:
                return s, int(m[1])
        return None


def _split_dim(stored: Stored) -> Optional[int]:
    """The dimension a stored tensor's atoms are split on over tensor ranks (None: whole on a rank)."""
    if stored.fused or stored.split in ("rows", "uneven_rows"):
        return 0
    return 1 if stored.split == "columns" else None


def _bounds(stored: Stored, n: int, tp: int) -> Optional[list[int]]:
    """Where each tensor rank's slice of an atom of size ``n`` along the split dimension starts, then ``n``;
    None when ``n`` does not split evenly as it must (the whole-tensor path says so)."""
    sizes = split_sizes(n, tp) if stored.split == "uneven_rows" else [n // tp] * tp
    return [sum(sizes[:r]) for r in range(tp + 1)] if sum(sizes) == n else None


def _aligned(source: Stored, source_tp: int, target: Stored, tp: int, model: ModelConfig, blocks: bool = True) -> bool:
    """Whether rank ``r``'s piece of ``source`` is rank ``r``'s piece of ``target`` (same atoms, fusion, split
    dimension and slice sizes), or with ``blocks=False`` holds the same rows of each atom, fused in other
    blocks."""
    dim = _split_dim(target)
    if source.atoms != target.atoms or (blocks and source.blocks != target.blocks) or _split_dim(source) != dim:
        return False
    n = A.shape(model, target.atoms[0])[dim]
    bounds = _bounds(target, n, tp)
    return source_tp == tp and bounds is not None and _bounds(source, n, tp) == bounds


def whole_shape(model: ModelConfig, stored: Stored) -> tuple[int, ...]:
    """The shape of a stored tensor at tensor-parallel size 1."""
    first = A.shape(model, stored.atoms[0])
    return (sum(A.rows(model, stored.atoms)), *first[1:]) if stored.fused else first


def _pattern(template: str) -> re.Pattern:
    head, _, tail = template.partition("{i}")
    return re.compile("^" + re.escape(head) + r"(\d+)" + re.escape(tail) + "$")


class Unit:
    """One unit of a model as some table stores it at some tensor-parallel size, read on demand.

    ``pieces(stored, key)`` returns the pieces of the ranks that hold the tensor (``stored.holders``).
    Whole tensors and atoms are computed once each and kept for the unit.

    ``rank_piece(stored, key, rank)``, when given, returns one rank's piece without touching the others' (a
    file read lazily, or this process's own piece). A target piece split along an atom dimension is then cut
    from just the source rows it needs (``_sliced``): at the same tensor-parallel size and split, from the
    same rank's piece alone. With ``local_rank``, ``rank_piece`` answers for that rank only, and the other
    ranks' pieces come from ``pieces`` (a collective: which tensors need it depends on the tables and sizes
    alone, so every rank calls it for the same tensors in the same order).

    ``exchange(stored, key, dim, bounds, join)``, with ``local_rank``, serves a target split on another
    dimension than its source at the same tensor-parallel size (the embedding: megatron-core splits the
    vocabulary, InternEvo the hidden size): a collective in which each rank gives every other rank the
    slice ``bounds[r]:bounds[r + 1]`` along ``dim`` of its piece, and gets back its own slice of every
    rank's piece, joined along ``join``. Each rank then receives just the part it keeps, instead of every
    rank's whole piece through ``pieces``."""

    def __init__(self, model: ModelConfig, unit: int, table: Table, tp: int,
                 pieces: Callable[[Stored, str], list[torch.Tensor]], layer_name: Optional[int] = None,
                 rank_piece: Optional[Callable[[Stored, str, int], torch.Tensor]] = None,
                 local_rank: Optional[int] = None,
                 exchange: Optional[Callable[[Stored, str, int, list[int], int], torch.Tensor]] = None):
        self.model, self.unit, self.tp, self.pieces = model, unit, tp, pieces
        self.rank_piece, self.local_rank, self.exchange = rank_piece, local_rank, exchange
        self.rows = table.keys(model, unit, layer_name)
        self._whole: dict[str, torch.Tensor] = {}
        self._atoms: dict[str, torch.Tensor] = {}

    def whole(self, key: str, stored: Stored) -> torch.Tensor:
        if key not in self._whole:
            if self.local_rank is not None and stored.split == "replicated":
                # a process's own live replica (megatron-core keeps them equal): nothing to gather or compare
                self._whole[key] = self.rank_piece(stored, key, self.local_rank)
            else:
                self._whole[key] = stored.join(self.pieces(stored, key))
        return self._whole[key]

    def atom(self, name: str) -> torch.Tensor:
        if name not in self._atoms:
            key, stored = next((k, s) for k, s in self.rows if name in s.atoms)
            if self.tp == 1 or stored.sliceable(self.tp):
                values = stored.unfuse(self.whole(key, stored))
            else:
                values = stored.merge(self.pieces(stored, key))
            self._atoms.update(zip(stored.atoms, values))
        return self._atoms[name]

    def same(self, target: Stored) -> Optional[tuple[str, Stored]]:
        """A source tensor laid out exactly like ``target`` (same atoms, same fusion), if any."""
        return next(((k, s) for k, s in self.rows if s.atoms == target.atoms and s.blocks == target.blocks), None)

    def piece(self, target: Stored, tp: int, rank: int, out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """``target``'s piece for tensor rank ``rank`` of ``tp`` (None when that rank's file has none). A piece
        joined from several source pieces is joined into ``out`` when given (the caller's own memory, of the
        piece's shape: then no copy follows); other pieces are returned as they are, views included."""
        if self.rank_piece is not None:
            sliced = self._sliced(target, tp, rank, out)
            if sliced is not None:
                return sliced
        same = self.same(target)
        if same is not None:
            return target.cut(self.whole(*same), tp, rank)
        return target.shard([self.atom(a) for a in target.atoms], tp, rank)

    def _sliced(self, target: Stored, tp: int, rank: int,
                out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """``target``'s piece from only the source rows it needs (through ``rank_piece``), or None where that
        does not apply: a target or source atom that is whole on a rank (the whole-tensor path reads and
        checks every replica), or, with ``local_rank``, a piece that needs other ranks' rows."""
        dim = _split_dim(target)
        if dim is None:
            return None
        same = self.same(target)
        if same is not None and _aligned(same[1], self.tp, target, tp, self.model):
            if self.local_rank is not None and rank != self.local_rank:
                return None
            return self.rank_piece(same[1], same[0], rank)  # the very same piece: no copy
        regrouped = next(((k, s) for k, s in self.rows if target.fused and s.atoms == target.atoms
                          and _aligned(s, self.tp, target, tp, self.model, blocks=False)), None)
        # (into ``out``, the atoms' rows go to their places below, read straight from the files)
        if regrouped is not None and out is None and (self.local_rank is None or rank == self.local_rank):
            held = self.rank_piece(regrouped[1], regrouped[0], rank)
            check_pieces([held], replicated=False)
            piece = target.fuse_from(regrouped[1], held, tp)
            if piece is not None:
                return piece
        parts = []
        for i, atom in enumerate(target.atoms):
            key, source = next((k, s) for k, s in self.rows if atom in s.atoms)
            source_dim = _split_dim(source)
            if source_dim is None:
                return None
            bounds = _bounds(target, A.shape(self.model, atom)[dim], tp)
            starts = _bounds(source, A.shape(self.model, atom)[source_dim], self.tp)
            if bounds is None or starts is None:
                return None
            if (self.local_rank is not None
                    and (source_dim, starts, self.tp, rank) != (dim, bounds, tp, self.local_rank)):
                # needs other ranks' rows: on every rank alike, since it depends on sizes only
                if (self.exchange is None or self.tp == 1 or source_dim == dim or source.fused or tp != self.tp
                        or rank != self.local_rank):
                    return None
                exchanged = self.exchange(source, key, dim, bounds, source_dim)
                if target.fused and out is not None:
                    target.put_rows(out, i, 0, exchanged, tp)
                else:
                    parts.append(exchanged)
                continue
            lo, hi = bounds[rank:rank + 2]
            if source_dim == dim:  # the source ranks whose slices overlap [lo, hi)
                ranks = [j for j in range(self.tp) if starts[j] < hi and starts[j + 1] > lo]
            else:  # split across: every source rank holds a part of these rows
                ranks = list(range(self.tp))
            cut = []
            for j in ranks:
                held = self.rank_piece(source, key, j)
                held = source.atom_of(held, source.atoms.index(atom), self.tp)
                if source_dim == dim:
                    start = max(lo, starts[j])
                    cut.append(held.narrow(dim, start - starts[j], min(hi, starts[j + 1]) - start))
                else:
                    cut.append(held.narrow(dim, lo, hi - lo))
            check_pieces(cut, replicated=False)
            if target.fused and out is not None:  # the atom's rows straight to their places in ``out``
                first = 0
                for rows in cut if source_dim == 0 else [concat(cut, source_dim) if len(cut) > 1 else cut[0]]:
                    target.put_rows(out, i, first, rows, tp)
                    first += rows.shape[0]
                if first != target.rows[i] // tp:
                    raise ValueError(f"{target.name}: {first} rows of {atom} for a piece that holds "
                                     f"{target.rows[i] // tp}")
                continue
            joined = None if len(cut) == 1 else concat(cut, source_dim, out=out)  # (a fused target's out is None)
            parts.append(cut[0] if joined is None else joined)
        if target.fused:
            return out if out is not None else target.fuse(parts, target.rank_blocks(tp))
        return parts[0]

    def convert(self, table: Table, tp: int, rank: int, layer_name: Optional[int] = None,
                only: Optional[Container[str]] = None, into: Optional[Callable[[str], Optional[torch.Tensor]]] = None
                ) -> Iterator[tuple[str, Stored, torch.Tensor]]:
        """``(key, stored, piece)`` of rank ``rank``'s file in ``table``, in its order; the layer is
        numbered ``layer_name`` there (default: its global index). With ``only``, just those keys (the
        source tensors only the others need are not read); with ``into``, a joined piece goes into
        ``into(key)`` where that gives memory (``piece``'s ``out``)."""
        for key, stored in table.keys(self.model, self.unit, layer_name):
            if only is not None and key not in only:
                continue
            piece = self.piece(stored, tp, rank, into(key) if into is not None else None)
            if piece is not None:
                yield key, stored, piece


def whole_unit(model: ModelConfig, unit: int, table: Table, get: Callable[[str], torch.Tensor]) -> Unit:
    """A unit whose whole (tp=1) stored tensors ``get(key)`` returns, keyed with global layer numbers."""
    return Unit(model, unit, table, 1, lambda stored, key: [get(key)])
