"""A pipeline stage's checkpoint files, written by its tensor and data-parallel ranks together.

A file holds whole tensors (InternEvo's layout, readable at any layout). The weights are whole on every
data-parallel rank, but ZeRO-1 holds each parameter's optimizer state in parts, one per rank: gathering a file
at one rank would move about half of every state across the network before it is written, where DeepSpeed's
own checkpoint writes each rank's flat partition as it is. So each unit of a file (the embedding, a layer, the
final norm and head) is written by one data-parallel rank, its *owner*: the rank whose partition holds most of
it. Only units that a partition boundary cuts move (their other parts go to the owner,
``optimizer_state.ZeroStates``), and each rank writes about its share of every file, as DeepSpeed's ranks do.
A file is assembled in place (``checkpoint.io.shared_write``): its creator reserves it, every owner writes its
tensors where they go, and the creator seals it and renames it into place. Tensor ranks write into each other's
files too: each holds some of the vocabulary's rows of the embedding, which every file splits on the hidden
size, and writes them into every file as ``Rows``.

Ranks write into one file, so they must see one file system: with ``shared`` False (object-storage saves,
staged in each node's own folder, by a job on several nodes) every unit of a file is owned by its creator,
which then receives every part.
"""

from __future__ import annotations

import functools
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.distributed as dist

from adapter.checkpoint.io.shared_write import Part, reserve, seal, whole_crc, write_records
from adapter.config.schema import ModelConfig
from adapter.runtime.layout import ParallelLayout


@dataclass(frozen=True)
class Owners:
    """Which data-parallel rank writes each unit of a file (``units``: ``(chunk, unit)`` → rank) and so
    receives each parameter's optimizer state (``params``, in ``ZeroStates``' parameter order)."""

    units: dict[tuple[int, int], int]
    params: list[int]

    def of(self, rank: int) -> set[tuple[int, int]]:
        """The ``(chunk, unit)`` pairs ``rank`` writes."""
        return {u for u, owner in self.units.items() if owner == rank}


def unit_params(model: ModelConfig, layout: ParallelLayout, pp_rank: int, chunks: list) -> list[tuple[tuple[int, int], list[int]]]:
    """``((chunk, unit), parameter indices)`` of every unit of this pipeline rank's file, in order; the
    parameters are numbered through the chunks' ``named_parameters``, and each belongs to exactly one unit."""
    from adapter.model.mapping import chunk_units, mcore_table

    out, start, seen = [], 0, set()
    for vp, chunk in enumerate(chunks):
        index = {name: start + i for i, (name, _) in enumerate(chunk.named_parameters())}
        start += len(index)
        for unit, local in chunk_units(model, layout, pp_rank, vp):
            params = [index[key] for key, _ in mcore_table(model).keys(model, unit, local) if key in index]
            out.append(((vp, unit), params))
            seen.update(params)
    if len(seen) != start:
        raise RuntimeError(f"{start - len(seen)} parameters belong to no unit of the checkpoint's tables")
    return out


def owners(units: list[tuple[tuple[int, int], list[int]]], held: list[list[int]], writers: list[int]) -> Owners:
    """Each unit's owner among the data-parallel ranks ``writers``: the one holding most of its elements
    (``held[r][i]``: how many of parameter ``i`` rank ``r``'s partition holds; ties go to the lower rank)."""
    by_unit, by_param = {}, [0] * len(held[0])
    for unit, params in units:
        owner = max(writers, key=lambda r: (sum(held[r][i] for i in params), -r))
        by_unit[unit] = owner
        for i in params:
            by_param[i] = owner
    return Owners(by_unit, by_param)


def even_shares(sizes: list[int], dp: int) -> list[list[int]]:
    """``held`` for parameters of ``sizes`` elements laid end to end and cut into ``dp`` equal ranges, as
    ZeRO partitions them: the shares by which the weights-only files are split when there is no optimizer
    state to follow."""
    total, starts, out = sum(sizes), [0], []
    for n in sizes:
        starts.append(starts[-1] + n)
    for r in range(dp):
        lo, hi = r * total // dp, (r + 1) * total // dp
        out.append([max(0, min(hi, starts[i + 1]) - max(lo, starts[i])) for i in range(len(sizes))])
    return out


@functools.lru_cache(maxsize=32)
def file_skeleton(model: ModelConfig, layout: ParallelLayout, tp_rank: int, pp_rank: int,
                  dtype: torch.dtype) -> "OrderedDict[str, torch.Tensor]":
    """The names, shapes and order of ``model_tp{tp_rank}_pp{pp_rank}.pt``, as ``meta`` tensors of ``dtype``
    (kept: a run's every save writes the same files; not to be changed)."""
    from adapter.checkpoint.formats.internevo import shard_state_dict
    from adapter.model.mapping import logical_shapes

    logical = {k: torch.empty(s, dtype=dtype, device="meta") for k, s in logical_shapes(model).items()}
    return shard_state_dict(logical, model, layout, tp_rank, pp_rank)


@dataclass(frozen=True)
class Rows:
    """Rows ``start:start + len(tensor)`` of a file's tensor, the part of it one rank writes (the embedding:
    each tensor rank holds some of the vocabulary's rows of every tensor rank's file)."""

    start: int
    tensor: torch.Tensor


def _tensor(value: Union[torch.Tensor, Rows]) -> torch.Tensor:
    return value.tensor if isinstance(value, Rows) else value


def _offset(f: "File", name: str, value: Union[torch.Tensor, Rows]) -> int:
    """Where in its record ``value`` (``name``'s whole tensor, or rows of it) goes, once checked against the
    file's skeleton."""
    want, t = f.skeleton.get(name), _tensor(value)
    start = value.start if isinstance(value, Rows) else 0
    fits = (want is not None and want.dtype == t.dtype and
            (want.shape == t.shape if not isinstance(value, Rows) else
             want.dim() > 0 and want.shape[1:] == t.shape[1:] and 0 <= start <= want.shape[0] - len(t)))
    if not fits:
        what = f"rows {start}:{start + len(t)} of " if isinstance(value, Rows) else ""
        raise RuntimeError(f"{f.path.name}: {what}{name} {tuple(t.shape)} {t.dtype} is not the file's "
                           f"{None if want is None else (tuple(want.shape), want.dtype)}")
    return start * math.prod(want.shape[1:]) * want.element_size()


@dataclass(frozen=True)
class File:
    """A file a group of ranks writes together: its tensors' names, shapes and order (``skeleton``, as ``meta``
    tensors) and the rank of the group that reserves, seals and renames it."""

    path: Path
    skeleton: "OrderedDict[str, torch.Tensor]"
    creator: int


class Together:
    """Writing ``files`` with the other ranks of ``group`` (a CPU group: only small objects
    travel on it): the constructor reserves every file at its creator, ``write`` writes this rank's tensors
    of one, ``close`` seals and renames them all. The constructor and ``close`` are collective. A failure on
    any rank is raised on every rank by the constructor or ``close``, and leaves no file behind."""

    def __init__(self, files: list[File], group: Optional[dist.ProcessGroup]):
        self.files, self.group = files, group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.written: dict[int, list[Part]] = {}  # file → the parts this rank wrote, with their CRC-32s
        self.failure: Optional[BaseException] = None
        made, self.reserved = {}, {}
        for i, f in enumerate(files):
            if f.creator == self.rank and self.failure is None:
                tmp = unfinished(f.path)
                try:
                    tmp.parent.mkdir(exist_ok=True)
                    self.reserved[i] = reserve(tmp, f.skeleton)
                    made[i] = (str(tmp), self.reserved[i].places)
                except Exception as exc:
                    self.failure = exc
        heads = self._exchange(made)
        self.tmp = {i: Path(tmp) for head in heads for i, (tmp, _) in head.items()}
        self.places = {i: places for head in heads for i, (_, places) in head.items()}

    def write(self, i: int, content: Mapping[str, Union[torch.Tensor, Rows]]) -> None:
        """This rank's tensors of ``files[i]``, or rows of them (after a failure here, nothing: ``close``
        raises it). Called once per file at most."""
        if self.failure is not None:
            return
        f = self.files[i]
        index = {name: n for n, name in enumerate(f.skeleton)}
        try:
            parts = [(index.get(name), _offset(f, name, value), _tensor(value)) for name, value in content.items()]
            # a rank with nothing to write never opens the file (it may live on another node's disk)
            self.written[i] = write_records(self.tmp[i], self.places[i], parts) if parts else []
        except Exception as exc:
            self.failure = exc

    def close(self) -> None:
        """Seal every file this rank created and rename it into place, once every rank has written."""
        written = self._exchange(self.written)
        crcs = []
        for i, f in enumerate(self.files):
            parts: dict[int, list] = {}
            for part in (part for w in written for part in w.get(i, [])):
                parts.setdefault(part.index, []).append(part)
            crcs.append({})
            for n, (name, t) in enumerate(f.skeleton.items()):
                try:
                    crcs[i][n] = whole_crc(parts.get(n, []), t.numel() * t.element_size())
                except ValueError as exc:  # a bug in the owners
                    self._remove()
                    raise RuntimeError(f"{f.path}: {name}: the ranks wrote {exc}") from None
        for i, f in enumerate(self.files):
            if f.creator == self.rank:
                seal(self.tmp[i], crcs[i], self.reserved[i])
                os.replace(self.tmp[i], f.path)
                drop_unfinished(self.tmp[i].parent)

    def _remove(self) -> None:
        """Remove the unfinished files this rank created."""
        for f in self.files:
            if f.creator == self.rank:
                unfinished(f.path).unlink(missing_ok=True)
                drop_unfinished(unfinished(f.path).parent)

    def _exchange(self, mine: dict) -> list[dict]:
        """Every rank's ``mine``, or, where any rank failed, that failure raised everywhere and the files this
        rank created removed."""
        from adapter.checkpoint.errors import CheckpointError

        error = None if self.failure is None else f"{type(self.failure).__name__}: {self.failure}"
        outcomes: list = [None] * self.size
        dist.all_gather_object(outcomes, (mine, error), group=self.group)
        failed = [(r, e) for r, (_, e) in enumerate(outcomes) if e is not None]
        if failed:
            self._remove()
            if self.failure is not None:
                raise self.failure
            rank, error = failed[0]
            rank = rank if self.group is None else dist.get_global_rank(self.group, rank)
            raise CheckpointError(f"{self.files[0].path.parent}: rank {rank} could not write its part of the "
                                  f"checkpoint: {error}")
        return [m for m, _ in outcomes]


def unfinished(path: Path) -> Path:
    """Where this process writes ``path`` until it is complete (every file of a training checkpoint): a
    folder of its own beside it, so that the file keeps its name (``torch.save`` names the archive inside
    after the file) and is renamed into place."""
    return path.parent / f".unfinished-{os.getpid()}" / path.name


def drop_unfinished(folder: Path) -> None:
    """Remove ``unfinished``'s folder once it is empty (another of this process's files may still be in it)."""
    try:
        folder.rmdir()
    except OSError:
        pass
