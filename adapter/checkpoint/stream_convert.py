"""Write a checkpoint in any format (``internevo``, ``mcore``, ``mcore-legacy``, ``hf``) one model unit at a time.

A *unit* is the embedding, one transformer layer, or the final norm with the head. The converter reads one
unit's logical tensors from the source (once, whatever the number of target files that need them), then
cuts each target file's pieces of that unit, one file at a time, and appends them to the open files
(``stream_write``; ``mcore_dist.DistcpWriter`` for ``torch_dist``). Memory stays about one unit in logical
form plus one file's pieces of it, never a whole file or a whole model.

The per-format mappings are the same functions the in-memory paths use (``stage_state_dicts``,
``chunk_state_dict`` and ``sharded_items``, ``iter_hf_tensors``): they are called with a view in which the
current unit's tensors are real and every other tensor is a ``meta`` placeholder (shapes only, no work),
and the real tensors that come out are exactly the unit's pieces, in file order. Every target file holds
its units in model order, and the writers check each tensor's position, so nothing can land in the wrong
record.
"""
from __future__ import annotations

import json
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch

from adapter.checkpoint.memory import trim_heap
from adapter.checkpoint.stream_write import Ordered, SafetensorsWriter, TorchFileWriter, leaves
from adapter.config.schema import ModelConfig
from adapter.model.mapping import LOGICAL_NAMES, logical_keys, model_units
from adapter.runtime.layout import ParallelLayout


@dataclass
class FileGroup:
    """Target files built from the same logical tensors (all tensor ranks of one pipeline stage, or all
    shards of an HF export). ``build`` maps a logical view to one structure per file, lazily, so that only
    one file's pieces exist at a time."""

    names: list[str]
    units: set[int]
    build: Callable[[Mapping[str, torch.Tensor]], Iterator[Any]]
    open: Callable[[Path, Any], Ordered] = TorchFileWriter
    """Opens one file's writer from its path and its structure of ``meta`` placeholders."""


def _stage_units(model: ModelConfig, layout: ParallelLayout, p: int) -> set[int]:
    units = set()
    for start, end in layout.stages[p]:
        units.update(1 + i for i in range(start, end))
        if start == 0:
            units.add(0)
        if end == model.num_layers:
            units.add(model.num_layers + 1)
    return units


def internevo_groups(model: ModelConfig, layout: ParallelLayout) -> list[FileGroup]:
    from adapter.checkpoint.internevo import stage_state_dicts

    def build(view: Mapping[str, torch.Tensor], p: int) -> Iterator[dict]:
        for t in range(layout.tp):
            yield stage_state_dicts(view, model, layout, p, [t], copy=False)[0]

    return [FileGroup([f"model_tp{t}_pp{p}.pt" for t in range(layout.tp)], _stage_units(model, layout, p),
                      lambda view, p=p: build(view, p))
            for p in range(layout.pp)]


def mcore_legacy_groups(model: ModelConfig, layout: ParallelLayout, iteration: int = 0) -> list[FileGroup]:
    from adapter.checkpoint.mcore_legacy import rank_dir
    from adapter.model.mapping import chunk_state_dict

    def build(view: Mapping[str, torch.Tensor], p: int) -> Iterator[dict]:
        for t in range(layout.tp):
            state: dict = {"iteration": iteration, "checkpoint_version": 3.0}
            chunks = [chunk_state_dict(view, model, layout, p, vp, t, copy=False) for vp in range(layout.vpp)]
            if layout.vpp == 1:
                state["model"] = chunks[0]
            else:
                state.update({f"model{vp}": c for vp, c in enumerate(chunks)})
            yield state

    return [FileGroup([f"iter_{iteration:07d}/{rank_dir(t, p, layout.pp)}/model_optim_rng.pt"
                       for t in range(layout.tp)], _stage_units(model, layout, p),
                      lambda view, p=p: build(view, p))
            for p in range(layout.pp)]


def hf_groups(model: ModelConfig, meta: Mapping[str, torch.Tensor], shard_bytes: int) -> list[FileGroup]:
    """One group holding every shard; tensors are assigned to shards in order, at most ``shard_bytes`` each
    (the names follow transformers: one ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``)."""
    from adapter.checkpoint.hf import iter_hf_tensors

    shards: list[list[str]] = [[]]
    size = 0
    for key, t in iter_hf_tensors(meta, model):
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])

    def build(view: Mapping[str, torch.Tensor]) -> Iterator[OrderedDict]:
        tensors = OrderedDict(iter_hf_tensors(view, model))
        return (OrderedDict((k, tensors[k]) for k in keys) for keys in shards)

    return [FileGroup(names, set(range(model.num_layers + 2)), build,
                      lambda path, skeleton: SafetensorsWriter(path, skeleton, {"format": "pt"}))]


def mcore_groups(model: ModelConfig, meta: Mapping[str, torch.Tensor]) -> list[FileGroup]:
    """megatron-core's ``torch_dist``: one data file of layout-free chunks (``mcore_dist``)."""
    from adapter.checkpoint.mcore_dist import (DATA_FILE, DistcpWriter, extra_state_keys, global_shapes,
                                               sharded_items, whole_model)
    from adapter.model.mapping import chunk_state_dict

    whole = whole_model(model)
    shapes = global_shapes(chunk_state_dict(meta, model, whole, 0, 0, 0, copy=False), model.num_layers)
    names = LOGICAL_NAMES[model.family]
    w1_w3 = {i: (names["w1"].format(i=i), names["w3"].format(i=i)) for i in range(model.num_layers)}
    mlp_inputs = {k for pair in w1_w3.values() for k in pair}

    def build(view: Mapping[str, torch.Tensor]) -> Iterator[OrderedDict]:
        # linear_fc1's two chunks are w1 and w3 as they are: the fused tensor is only cut on meta
        fused_on_meta = {k: view[k].to("meta") if k in mlp_inputs else view[k] for k in view}
        gate_up = {i: (view[a], view[b]) for i, (a, b) in w1_w3.items()}
        yield sharded_items(chunk_state_dict(fused_on_meta, model, whole, 0, 0, 0, copy=False), gate_up)

    return [FileGroup([DATA_FILE], set(range(model.num_layers + 2)), build,
                      lambda path, skeleton: DistcpWriter(path, skeleton, shapes, extra_state_keys(model.num_layers)))]


class _UnitView(Mapping[str, torch.Tensor]):
    """The logical state dict as the mappings see it during one unit: that unit's tensors real (read once,
    cast to the target dtype), every other one a ``meta`` placeholder."""

    def __init__(self, source: Mapping[str, torch.Tensor], meta: Mapping[str, torch.Tensor],
                 dtype: Optional[torch.dtype]):
        self.source, self.meta, self.dtype = source, meta, dtype
        self.current: set[str] = set()
        self.cache: dict[str, torch.Tensor] = {}

    def start(self, keys: Iterable[str]) -> None:
        self.current, self.cache = set(keys), {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.current:
            return self.meta[key]
        if key not in self.cache:
            value = self.source[key]
            self.cache[key] = value if self.dtype is None else value.to(self.dtype)
        return self.cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.meta)

    def __len__(self) -> int:
        return len(self.meta)


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


def write_streaming(source: Mapping[str, torch.Tensor], model: ModelConfig, fmt: str,
                    layout: Optional[ParallelLayout], folder: Path, *, dtype: Optional[torch.dtype] = None,
                    shard_bytes: int = 2 * 1024**3) -> None:
    """Write ``source`` (logical tensors) as ``fmt`` into ``folder`` (which must exist and be empty)."""
    meta = meta_tensors(source, model, dtype)
    if fmt == "internevo":
        groups = internevo_groups(model, layout)
    elif fmt == "mcore-legacy":
        groups = mcore_legacy_groups(model, layout)
    elif fmt == "hf":
        groups = hf_groups(model, meta, shard_bytes)
    elif fmt == "mcore":
        groups = mcore_groups(model, meta)
    else:
        raise ValueError(f"no streaming writer for {fmt!r}")
    writers: list[list[Any]] = []
    try:
        _write_all(source, model, meta, groups, writers, folder, dtype)
    except BaseException:
        for files in writers:
            for writer in files:
                writer.abort()
        raise
    if fmt == "hf":
        _finish_hf(groups[0], meta, model, folder)
    elif fmt == "mcore":
        from adapter.checkpoint.mcore_dist import finish_folder

        finish_folder(folder, model)


def _write_all(source: Mapping[str, torch.Tensor], model: ModelConfig, meta: dict[str, torch.Tensor],
               groups: list[FileGroup], writers: list[list[Any]], folder: Path, dtype: Optional[torch.dtype]) -> None:
    """Open every file of ``groups`` (into ``writers``, so a failure can let them go), stream the units, close."""
    for group in groups:
        files = []
        writers.append(files)
        for name, skeleton in zip(group.names, group.build(meta)):
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            files.append(group.open(path, skeleton))
    view = _UnitView(source, meta, dtype)
    bar = _progress(sum(t.numel() * t.element_size() for t in meta.values()))
    for u, keys in enumerate(model_units(model)):
        view.start(keys)
        for group, files in zip(groups, writers):
            if u in group.units:
                _write_unit(group, files, view)
        if bar is not None:
            bar.update(sum(meta[k].numel() * meta[k].element_size() for k in keys))
        view.start(())
        trim_heap()
    for files in writers:
        for writer in files:
            writer.close()
    if bar is not None:
        bar.close()


def _write_unit(group: FileGroup, files: list[Any], view: _UnitView) -> None:
    """Append the current unit's pieces to each file of ``group``, cutting one file's pieces at a time (a
    function, so that no loop variable keeps a piece, or the logical tensor it views, past the unit)."""
    for writer, structure in zip(files, group.build(view)):
        for position, (_, tensor) in enumerate(leaves(structure)):
            if tensor.device.type != "meta":
                writer.write(tensor, position)
        structure = tensor = None  # before the next file's pieces are cut


def _finish_hf(group: FileGroup, meta: Mapping[str, torch.Tensor], model: ModelConfig, folder: Path) -> None:
    from adapter.checkpoint.hf import hf_config

    (folder / "config.json").write_text(json.dumps(hf_config(model), indent=2) + "\n")
    if len(group.names) > 1:
        shards = list(group.build(meta))
        weight_map = {key: name for name, shard in zip(group.names, shards) for key in shard}
        total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
