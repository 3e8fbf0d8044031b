"""Write a checkpoint in any format one model unit at a time.

A *unit* is the embedding, one transformer layer, or the final norm with the head. The converter reads one
unit's logical tensors from the source (once, whatever the number of target files that need them), then
cuts each target file's pieces of that unit through the tensor tables, one piece at a time, and appends
them to the open files (``io.stream_write``; ``formats.mcore.DistcpWriter`` for ``torch_dist``). Memory
stays about one unit in logical form plus one piece, never a whole file or a whole model.

Each format describes its files as ``FileGroup``s (``adapter.checkpoint.formats``): which units a group's
files hold and a function giving one unit's entries. The same function run on ``meta`` tensors gives each
file's structure up front (a writer needs it before the first byte), and on the real unit its tensors, in
the same order; the writers check each tensor's position, so nothing can land in the wrong record.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import torch

from adapter.checkpoint.io.memory import trim_heap
from adapter.checkpoint.io.stream_write import Ordered, TorchFileWriter
from adapter.config.schema import ModelConfig
from adapter.families import logical_table
from adapter.model.mapping import logical_keys
from adapter.weights import atoms
from adapter.weights.table import Unit, whole_unit

Entry = tuple[int, Any, torch.Tensor]
"""One tensor of a unit: the index of its file in the group, its place in that file's structure, the tensor."""


@dataclass
class FileGroup:
    """Target files built from the same units (all tensor ranks of one pipeline stage, or all shards of an
    HF export)."""

    names: list[str]
    units: list[int]
    """The units the files hold, in model order."""
    entries: Callable[[Unit], Iterator[Entry]]
    """One unit's entries, each file's in that file's order."""
    structure: Callable[[list[tuple[Any, torch.Tensor]]], Any]
    """A file's structure (what it pickles) from its entries, in order."""
    open: Callable[[Path, Any], Ordered] = TorchFileWriter
    """Opens one file's writer from its path and its structure of ``meta`` placeholders."""

    def skeletons(self, model: ModelConfig, meta: Mapping[str, torch.Tensor]) -> list[Any]:
        """Every file's structure, with ``meta`` tensors (shapes and dtypes only)."""
        per_file: list[list[tuple[Any, torch.Tensor]]] = [[] for _ in self.names]
        for unit in self.units:
            for f, place, t in self.entries(whole_unit(model, unit, logical_table(model), meta.__getitem__)):
                per_file[f].append((place, t))
        return [self.structure(entries) for entries in per_file]


def meta_tensors(source: Mapping[str, torch.Tensor], model: ModelConfig,
                 dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """Shapes and dtypes of the logical tensors, without reading data where the source can say so."""
    out = {}
    for key in logical_keys(model):
        t = source.meta(key) if hasattr(source, "meta") else source[key].to("meta")
        out[key] = t if dtype is None else t.to(dtype)
    return out


def _progress(total: int) -> Any:
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="write", unit="B", unit_scale=True, unit_divisor=1024)


def write_groups(source: Mapping[str, torch.Tensor], model: ModelConfig, groups: list[FileGroup],
                 meta: Mapping[str, torch.Tensor], folder: Path, dtype: Optional[torch.dtype] = None) -> None:
    """Write ``source`` (logical tensors) into ``folder`` as ``groups`` describe, one unit at a time. On a
    failure every open file is let go quietly (``abort``) before the error goes on."""
    writers: list[list[Ordered]] = []
    try:
        _write_all(source, model, groups, meta, folder, dtype, writers)
    except BaseException:
        for files in writers:
            for writer in files:
                writer.abort()
        raise


def _write_all(source: Mapping[str, torch.Tensor], model: ModelConfig, groups: list[FileGroup],
               meta: Mapping[str, torch.Tensor], folder: Path, dtype: Optional[torch.dtype],
               writers: list[list[Ordered]]) -> None:
    """Open every file (into ``writers`` as they open, so a failure can let them go), stream the units, close."""
    for group in groups:
        files: list[Ordered] = []
        writers.append(files)
        for name, skeleton in zip(group.names, group.skeletons(model, meta)):
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            files.append(group.open(path, skeleton))

    def read(key: str) -> torch.Tensor:
        value = source[key]
        return value if dtype is None else value.to(dtype)

    bar = _progress(sum(t.numel() * t.element_size() for t in meta.values()))
    table = logical_table(model)
    for unit in range(atoms.num_units(model)):
        _write_unit(whole_unit(model, unit, table, read), groups, writers)
        if bar is not None:
            bar.update(sum(meta[k].numel() * meta[k].element_size() for k, _ in table.keys(model, unit)))
        trim_heap()
    for files in writers:
        for writer in files:
            writer.close()
    if bar is not None:
        bar.close()


def _write_unit(unit: Unit, groups: list[FileGroup], writers: list[list[Ordered]]) -> None:
    """Append one unit's pieces to the files that hold it (a function, so that nothing of the unit
    outlives it: the caller trims the heap right after)."""
    for group, files in zip(groups, writers):
        if unit.unit in group.units:
            for f, _, tensor in group.entries(unit):
                files[f].write(tensor)
