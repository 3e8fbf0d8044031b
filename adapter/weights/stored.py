"""One stored tensor of one format: which model *atoms* it holds, how they are fused, how it splits.

An atom is a tensor every format agrees on (``q.weight``, ``gate``, ``head``…, see ``weights.atoms``). A
stored tensor holds one atom, or several fused on rows: InternEvo's ``wqkv`` holds ``q``, ``k`` and ``v``,
megatron-core's ``linear_fc1`` holds ``gate`` and ``up``. Fusion is written once, here:

* the atoms' rows are cut into ``blocks`` equal blocks and interleaved block by block: block ``b`` of the
  fused tensor is ``[atom_0 block b; atom_1 block b; …]``. ``blocks = 1`` is plain concatenation
  (InternLM1's ``Wqkv = [Q; K; V]``); ``blocks = kv heads`` is the grouped-query layout (InternLM2's
  ``wqkv`` and megatron-core's ``linear_qkv``: per kv head, its query heads, then its k, then its v).

The tensor-parallel split is one of a few kinds:

* ``replicated``: whole on every rank; ``first``: whole on rank 0 only (InternEvo's row-parallel bias);
* ``rows``/``columns``: equal slices of dim 0/1; ``uneven_rows``: InternEvo's head, first ranks one row
  larger when the vocabulary does not divide;
* a fused tensor always splits on rows *atom by atom*: rank ``r`` holds the fusion of every atom's
  ``r``-th row slice, with ``blocks / tp`` blocks (so a grouped qkv splits into whole kv groups, a slice of
  the fused tensor) or, when ``blocks = 1``, one (``[Q_r; K_r; V_r]``, megatron's ``[gate_r; up_r]``).

Everything only slices, reshapes and concatenates, so every conversion is bit-exact. Pieces are checked
before they are joined (``check_pieces``): each one floating point and of the first piece's dtype (``torch.cat``
would promote silently), and every replica of a replicated tensor of the first one's shape and, when data is
read, bytes; a conversion never picks one replica and drops the others unseen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from adapter.checkpoint.io import mapped
from adapter.checkpoint.io.memory import empty_to_fill

SPLITS = ("replicated", "first", "rows", "columns", "uneven_rows")


def split_sizes(n: int, parts: int) -> list[int]:
    """InternEvo's uneven split: rank ``r`` gets ``n // parts + (r < n % parts)`` (first ranks larger)."""
    return [n // parts + (r < n % parts) for r in range(parts)]


def concat(tensors: Sequence[torch.Tensor], dim: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch.cat`` into new memory (``empty_to_fill``) or ``out``, piece by piece through ``mapped.copy``,
    which reads a piece mapped from a checkpoint file with ``pread`` rather than faulting its pages in. On
    ``meta`` tensors (shapes only: file skeletons, ``inspect``) the result's shape is computed here, since
    torch's meta ``cat`` imports ``torch._dynamo`` (seconds of fixed cost per command)."""
    first = tensors[0]
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    if first.is_meta:
        return out if out is not None else torch.empty(shape, dtype=first.dtype, device="meta")
    if out is None:
        if not all(t.dtype == first.dtype and t.device == first.device and not t.requires_grad for t in tensors):
            return torch.cat(list(tensors), dim)  # torch's type promotion and autograd
        out = empty_to_fill(shape, first.dtype, first.device)
    elif list(out.shape) != shape:
        raise ValueError(f"joining pieces into a tensor of shape {tuple(out.shape)}: they make {tuple(shape)}")
    start = 0
    for t in tensors:
        mapped.copy(out.narrow(dim, start, t.shape[dim]), t)
        start += t.shape[dim]
    return out


class PieceError(ValueError):
    """Pieces of one tensor that cannot be joined. ``index`` is the offending piece's position; ``problem``
    reads after the tensor's name and names the first piece as ``{first}`` (formats name pieces by file)."""

    def __init__(self, index: int, problem: str):
        self.index, self.problem = index, problem
        super().__init__(self.describe(lambda i: f"piece {i}", "the tensor"))

    def describe(self, name_of, key: str) -> str:
        return f"{name_of(self.index)}: {key} {self.problem.format(first=name_of(0))}"


def check_pieces(pieces: Sequence[torch.Tensor], replicated: bool) -> None:
    """Refuse pieces that would be joined into something none of them says (see the module docstring)."""
    first = pieces[0]
    for i, piece in enumerate(pieces):
        if not piece.is_floating_point():
            raise PieceError(i, f"is {piece.dtype}: a weight must be floating point")
        if piece.dtype != first.dtype:
            raise PieceError(i, f"is {piece.dtype}, its piece in {{first}} {first.dtype}")
        if replicated and i:
            if piece.shape != first.shape:
                raise PieceError(i, f"has shape {tuple(piece.shape)}, its replica in {{first}} {tuple(first.shape)}")
            if not piece.is_meta and not first.is_meta and not same_bytes(piece, first):
                raise PieceError(i, "differs from its replica in {first}")


def same_bytes(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same bytes (so a NaN matches the same NaN, which ``torch.equal`` does not count as equal)."""
    return torch.equal(x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8))


def _slice(t: torch.Tensor, dim: int, sizes: Sequence[int], rank: int) -> torch.Tensor:
    return t.narrow(dim, sum(sizes[:rank]), sizes[rank])


def _even(t: torch.Tensor, dim: int, parts: int, what: str) -> list[int]:
    n = t.shape[dim]
    if n % parts:
        raise ValueError(f"{what}: dimension {dim} of a {tuple(t.shape)} tensor does not split into {parts} "
                         "equal parts")
    return [n // parts] * parts


@dataclass(frozen=True)
class Stored:
    """A tensor as one format stores it. ``name`` may hold ``{i}``, the layer number in that format's files."""

    name: str
    atoms: tuple[str, ...]
    split: str = "replicated"
    blocks: int = 1
    """Fused tensors: the row blocks its atoms are interleaved in (see the module docstring)."""
    rows: tuple[int, ...] = ()
    """Fused tensors: each atom's row count (GQA's q has more rows than k and v); ``Table.of`` fills it."""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"{self.name}: unknown split {self.split!r}")
        if self.fused and self.split != "rows":
            raise ValueError(f"{self.name}: a fused tensor splits on rows")

    @property
    def fused(self) -> bool:
        return len(self.atoms) > 1

    def holders(self, tp: int) -> list[int]:
        """The tensor ranks whose files hold a piece."""
        return [0] if self.split == "first" else list(range(tp))

    # -- whole tensor ⇄ atoms ------------------------------------------------------------------------------
    def fuse(self, atoms: Sequence[torch.Tensor], blocks: Optional[int] = None) -> torch.Tensor:
        """The stored tensor from its atoms (a single atom is returned as it is); ``blocks`` defaults to the
        whole tensor's (a rank's piece has ``rank_blocks``). Into a caller's memory: ``put_rows``."""
        if not self.fused:
            return atoms[0]
        b = self.blocks if blocks is None else blocks
        rest = tuple(atoms[0].shape[1:])
        return concat([a.reshape(b, a.shape[0] // b, *rest) for a in atoms], 1).reshape(-1, *rest)

    def fuse_from(self, source: "Stored", piece: torch.Tensor, tp: int) -> Optional[torch.Tensor]:
        """A rank's piece of this tensor from its piece of ``source``, the same atoms fused in other blocks
        (InternLM1's ``[Q; K; V]`` against megatron-core's per-head ``[q; k; v]``), in one copy where either
        has one block (``fuse`` of each ``atom_of`` copies twice); None where both have several."""
        b, sb = self.rank_blocks(tp), source.rank_blocks(tp)
        if not (b == 1 or sb == 1):
            return None
        rest = tuple(piece.shape[1:])
        sizes = [r // tp for r in self.rows]
        if piece.is_meta:
            return torch.empty(sum(sizes), *rest, dtype=piece.dtype, device="meta")
        out = empty_to_fill((sum(sizes), *rest), piece.dtype, piece.device)
        piece = mapped.read(piece)  # a mapped piece is read once with pread, not faulted in atom by atom
        into, held = out.view(b, sum(sizes) // b, *rest), piece.reshape(sb, sum(sizes) // sb, *rest)
        for i, n in enumerate(sizes):
            # one side is a contiguous run of the atom's rows: viewed in the other's blocks
            dst = into.narrow(1, sum(sizes[:i]) // b, n // b)
            src = held.narrow(1, sum(sizes[:i]) // sb, n // sb)
            if b == 1:
                dst.view(sb, n // sb, *rest).copy_(src)
            else:
                dst.copy_(src.reshape(b, n // b, *rest))
        return out

    def put_rows(self, out: torch.Tensor, i: int, first: int, rows: torch.Tensor, tp: int) -> None:
        """Copy ``rows``, consecutive rows of atom ``i`` from its row ``first`` on, to their places in ``out``,
        a rank's piece of this tensor: a contiguous run in each block they reach, each read straight from
        its file where ``rows`` is mapped (``mapped.copy``), with no joined atom or strided copy between."""
        b = self.rank_blocks(tp)
        sizes = [r // tp // b for r in self.rows]
        into, size, start = out.view(b, sum(sizes), *out.shape[1:]), sizes[i], sum(sizes[:i])
        at = 0
        while at < rows.shape[0]:
            block, row = divmod(first + at, size)
            n = min(size - row, rows.shape[0] - at)
            mapped.copy(into[block].narrow(0, start + row, n), rows.narrow(0, at, n))
            at += n

    def unfuse(self, fused: torch.Tensor, tp: int = 1) -> list[torch.Tensor]:
        """The atoms of the whole stored tensor, or (``tp > 1``) of one rank's piece of it."""
        return [self.atom_of(fused, i, tp) for i in range(len(self.atoms))]

    def atom_of(self, fused: torch.Tensor, i: int, tp: int = 1) -> torch.Tensor:
        """Atom ``i`` of ``unfuse(fused, tp)``, without copying the others (an atom of a tensor fused in
        several blocks is a copy: its rows are not contiguous)."""
        if not self.fused:
            return fused
        b = self.rank_blocks(tp)
        rest = tuple(fused.shape[1:])
        sizes = [r // tp // b for r in self.rows]
        return fused.reshape(b, sum(sizes), *rest).narrow(1, sum(sizes[:i]), sizes[i]).reshape(-1, *rest)

    # -- tensor parallelism ----------------------------------------------------------------------------------
    def rank_blocks(self, tp: int) -> int:
        """Blocks in one rank's piece of a fused tensor."""
        if self.blocks % tp == 0:
            return self.blocks // tp
        if self.blocks == 1:
            return 1
        raise ValueError(f"{self.name}: {self.blocks} groups do not split over {tp} tensor ranks")

    def sliceable(self, tp: int) -> bool:
        """Whether every rank's piece is a plain slice of the whole tensor (no regrouping)."""
        return not self.fused or self.blocks % tp == 0

    def shard(self, atoms: Sequence[torch.Tensor], tp: int, rank: int) -> Optional[torch.Tensor]:
        """Rank ``rank``'s piece from the whole atoms (None when that rank's file has none). Plain slices
        stay views; a caller that needs its own storage copies."""
        if self.fused:
            mine = [_slice(a, 0, _even(a, 0, tp, self.name), rank) for a in atoms]
            return self.fuse(mine, self.rank_blocks(tp))
        return self.cut(atoms[0], tp, rank)

    def cut(self, whole: torch.Tensor, tp: int, rank: int) -> Optional[torch.Tensor]:
        """Rank ``rank``'s piece from the whole stored tensor."""
        if self.split == "first":
            return whole if rank == 0 else None
        if self.split == "replicated":
            return whole
        if not self.sliceable(tp):
            return self.shard(self.unfuse(whole), tp, rank)
        if self.split == "uneven_rows":
            return _slice(whole, 0, split_sizes(whole.shape[0], tp), rank)
        dim = 1 if self.split == "columns" else 0
        return _slice(whole, dim, _even(whole, dim, tp, self.name), rank)

    def merge(self, pieces: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The whole atoms from the pieces of ``holders``."""
        check_pieces(pieces, self.split == "replicated")
        if not self.fused:
            return [self.join(pieces)]
        per_rank = [self.unfuse(p, len(pieces)) for p in pieces]
        return [concat([r[i] for r in per_rank], 0) for i in range(len(self.atoms))]

    def join(self, pieces: Sequence[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The whole stored tensor from the pieces of ``holders`` (into ``out`` when given: then always a
        copy; without it a replicated tensor is the rank-0 piece itself, once every replica is checked equal)."""
        check_pieces(pieces, self.split == "replicated")
        if self.split in ("first", "replicated") or (len(pieces) == 1 and out is None):
            return pieces[0] if out is None else out.copy_(pieces[0])
        if not self.sliceable(len(pieces)):
            whole = self.fuse(self.merge(pieces))
            return whole if out is None else out.copy_(whole)
        return concat(pieces, 1 if self.split == "columns" else 0, out=out)
