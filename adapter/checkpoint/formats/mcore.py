"""megatron-core's distributed checkpoint (``torch_dist``) of the adapter's model, one model unit at a time.

``torch_dist`` is PyTorch's distributed-checkpoint (DCP) format as megatron-core's ``dist_checkpointing``
uses it: every tensor is stored under a layout-free *sharded key* with its global shape, as chunks at global
offsets, so megatron-core's own ``dist_checkpointing.load`` reads it back at any tensor, pipeline and
virtual-pipeline layout. A folder holds:

* ``metadata.json`` (megatron's backend marker) and ``common.pt`` (its non-sharded state: empty for a model);
* ``.metadata``: a pickled DCP ``Metadata``: each key's global shape, dtype and chunks, and where each chunk
  lies (file, byte offset, length);
* ``__0_0.distcp``: the chunks, each a ``torch.save`` blob, and the ``_extra_state`` objects as
  ``torch.save`` bytes;
* ``internlm_model.json`` (ours): the model sizes in InternEvo's keys, which megatron's files do not record.

Sharded keys are megatron-core's for its GPT model: a layer's tensors are stacked on a leading layer axis
(``decoder.layers.self_attention.linear_qkv.weight`` is ``[L, rows, H]``, layer ``i`` is the chunk at
``(i, 0, 0)``); SwiGLU's ``linear_fc1`` is two chunks per layer, the gate rows then the up rows; each
linear layer's ``_extra_state`` is a bytes object ``…._extra_state/shard_{i}_{L}``. A test holds this
against what megatron-core's own ``dist_checkpointing.save`` writes, and loads ours with megatron's loader.

Writing (``DistcpWriter``, driven by ``stream_convert`` through ``file_groups``) takes the chunks in model order as they are cut
and writes ``.metadata`` last, so memory is one unit. Reading (``DistTensors``) unpickles nothing but DCP's
metadata classes (``safe_load.load_dcp_metadata``), reads a unit's chunks by offset however the saving
ranks split them (megatron's multi-rank saves split them by tensor rank), accepts Transformer Engine's fused
pre-norm names (``weights.mcore.TE_NAMES``: Megatron-LM's GPU models), and never loads the ``_extra_state``
objects.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.distributed.checkpoint.filesystem as dcp_files
import torch.distributed.checkpoint.metadata as md

from adapter.checkpoint.errors import CheckpointError
from adapter.checkpoint.io.lazy import UnitSource
from adapter.checkpoint.io.memory import empty_huge
from adapter.checkpoint.io.stream_write import Ordered
from adapter.checkpoint.io.torch_private import zip_reader
from adapter.checkpoint.stream_convert import FileGroup
from adapter.config.schema import ModelConfig
from adapter.families import FAMILIES, logical_table
from adapter.model.mapping import logical_shapes
from adapter.weights.mcore import local_spec_name, mcore_table
from adapter.weights.table import Unit, whole_shape, whole_unit

NAME = "mcore"
HELP = "megatron-core torch_dist (megatron loads it at any layout)"
NEEDS_LAYOUT = False
MODEL_JSON = "internlm_model.json"
DATA_FILE = "__0_0.distcp"
METADATA = ".metadata"
BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
           "common_backend": "torch", "common_backend_version": 1}
#: the layer's modules that carry an ``_extra_state`` (megatron's parallel linears; ``None`` without TE)
EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1",
                       "mlp.linear_fc2")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

Item = tuple[str, tuple[int, ...]]
"""A chunk: its sharded key and global offsets."""


def sharded_key(name: str) -> tuple[str, Optional[int]]:
    """A tp=1 megatron state-dict name → its sharded key and layer (None outside the layers)."""
    m = _LAYER.match(name)
    return (f"decoder.layers.{m[2]}", int(m[1])) if m else (name, None)


def unit_items(unit: Unit) -> "OrderedDict[Item, torch.Tensor]":
    """One unit's chunks, in order: each megatron tensor at tp=1 as one chunk at its global offsets, stacked
    on a leading layer axis inside the layers, except a tensor fused by plain concatenation (SwiGLU's
    ``linear_fc1``), which megatron stores as one chunk per atom (gate rows, then up rows)."""
    out: OrderedDict[Item, torch.Tensor] = OrderedDict()
    for name, stored in mcore_table(unit.model).keys(unit.model, unit.unit):
        key, layer = sharded_key(name)
        lead = () if layer is None else (layer,)
        if stored.fused and stored.blocks == 1:
            row = 0
            for atom in stored.atoms:
                t = unit.atom(atom)
                out[(key, lead + (row,) + (0,) * (t.dim() - 1))] = t.unsqueeze(0) if lead else t
                row += t.shape[0]
        else:
            t = unit.piece(stored, 1, 0)
            out[(key, lead + (0,) * t.dim())] = t.unsqueeze(0) if lead else t
    return out


def global_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Each sharded key's global shape."""
    out = {}
    for name, stored in mcore_table(model).all_keys(model):
        key, layer = sharded_key(name)
        out[key] = ((model.num_layers,) if layer is not None else ()) + whole_shape(model, stored)
    return out


def extra_state_keys(num_layers: int) -> list[str]:
    return [f"decoder.layers.{module}._extra_state/shard_{i}_{num_layers}"
            for i in range(num_layers) for module in EXTRA_STATE_MODULES]


class DistcpWriter(Ordered):
    """``__0_0.distcp`` and ``.metadata`` of a ``torch_dist`` folder; chunks are given one by one with
    ``write`` (in the order of ``items``), each stored as DCP's own writer stores it (``torch.save``)."""

    def __init__(self, path: Path, items: "OrderedDict[Item, torch.Tensor]", shapes: Mapping[str, tuple[int, ...]],
                 extra_state: list[str]):
        super().__init__(path, [(f"{k}@{o}", tuple(t.shape), t.dtype) for (k, o), t in items.items()])
        self.items, self.shapes = list(items), shapes
        self.state_dict_metadata: dict[str, Any] = {}
        self.storage_data: dict[Any, Any] = {}
        self.file = open(path, "wb")
        none = io.BytesIO()
        torch.save([None], none)  # megatron's stored form of a parallel linear's extra state (None without TE)
        for key in extra_state:
            self._record(md.MetadataIndex(key), none.getbuffer())
            self.state_dict_metadata[key] = md.BytesStorageMetadata()

    def _record(self, index: Any, data: Any) -> None:
        start = self.file.tell()
        if isinstance(data, torch.Tensor):
            torch.save(data, self.file)
        else:
            self.file.write(data)
        self.storage_data[index] = dcp_files._StorageInfo(self.path.name, start, self.file.tell() - start)

    def write(self, tensor: torch.Tensor, position: Optional[int] = None) -> None:
        """The next chunk (``position``, when given, must be its index in ``items``)."""
        tensor = self._check(tensor, position)
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # torch.save writes a view's whole storage
        key, offsets = self.items[self.next - 1]
        self._record(md.MetadataIndex(key, offsets), tensor)
        entry = self.state_dict_metadata.setdefault(key, md.TensorStorageMetadata(
            properties=md.TensorProperties(dtype=tensor.dtype), size=torch.Size(self.shapes[key]), chunks=[]))
        entry.chunks.append(md.ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=tensor.shape))

    def close(self) -> None:
        self._check_complete()
        self.file.close()
        metadata = md.Metadata(state_dict_metadata=self.state_dict_metadata, storage_data=self.storage_data)
        metadata.version = getattr(dcp_files, "CURRENT_DCP_VERSION", None)
        with open(self.path.parent / METADATA, "wb") as f:
            pickle.dump(metadata, f)


def finish_folder(folder: Path, model: ModelConfig) -> None:
    """The small files beside the chunks: megatron's backend marker and common state, and our model sizes."""
    from adapter.checkpoint.formats.internevo import model_config_dict

    (folder / "metadata.json").write_text(json.dumps(BACKEND))
    torch.save({}, folder / "common.pt")
    (folder / MODEL_JSON).write_text(json.dumps({"family": model.family, "model": model_config_dict(model)},
                                                indent=2))


def read_torch_dist(folder: Path, model: Optional[ModelConfig]) -> tuple[ModelConfig, "DistTensors"]:
    """The model sizes (from ``internlm_model.json`` unless given) and the folder's logical tensors, lazily."""
    from adapter.config.normalize import normalize_model

    if model is None:
        path = folder / MODEL_JSON
        if not path.exists():
            raise CheckpointError(f"{folder}: no {MODEL_JSON}, so the model sizes are unknown; pass --config")
        meta = json.loads(path.read_text())
        model = normalize_model(FAMILIES[meta["family"]].model_type, meta["model"], str(path))
    return model, DistTensors(folder, model)


class _Window(io.RawIOBase):
    """Bytes ``[start, start + length)`` of an open file as a file of their own (one DCP chunk, for torch.load)."""

    def __init__(self, f: Any, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.length + offset}[whence]
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(buffer).cast("B")[:n])
        self.pos += got
        return got


class DistTensors(UnitSource):
    """The logical tensors of a ``torch_dist`` folder, read one model unit at a time.

    The metadata is checked up front against the model (every sharded key present with its global shape,
    no other tensor, each layer's chunks tiling it, every chunk inside its file); a unit is assembled from
    its chunks, read with plain file reads, and converted through the tensor tables."""

    def __init__(self, folder: Path, model: ModelConfig):
        from adapter.checkpoint.io.safe_load import load_dcp_metadata

        self.folder = folder
        try:
            metadata = load_dcp_metadata(folder / METADATA)
        except Exception as exc:  # unpickling errors vary; a refused name is an UnsafeCheckpointError
            raise CheckpointError(f"{folder / METADATA}: cannot be read ({type(exc).__name__}: {exc})") from exc
        if not isinstance(metadata, md.Metadata):
            raise CheckpointError(f"{folder / METADATA}: holds a {type(metadata).__name__}, not DCP metadata")
        tensors, self.stored_key = {}, {}
        for stored, entry in metadata.state_dict_metadata.items():
            key = local_spec_name(stored)  # Transformer Engine's fused names read as the local spec's
            if key is not None and isinstance(entry, md.TensorStorageMetadata):
                tensors[key], self.stored_key[key] = entry, stored
        shapes = global_shapes(model)
        for key, shape in shapes.items():
            if key not in tensors:
                raise CheckpointError(f"{folder / METADATA}: missing tensor {key}")
            if tuple(tensors[key].size) != shape:
                raise CheckpointError(f"{folder / METADATA}: tensor {key} has shape {tuple(tensors[key].size)}, "
                                      f"expected {shape} for this model")
            if not tensors[key].properties.dtype.is_floating_point:
                raise CheckpointError(f"{folder / METADATA}: tensor {key} is {tensors[key].properties.dtype}: a "
                                      "weight must be floating point")
        unexpected = sorted(set(tensors) - set(shapes))
        if unexpected:
            raise CheckpointError(f"{folder / METADATA}: unexpected tensor {unexpected[0]}")
        self.entries = tensors
        self.renamed = any(key != stored for key, stored in self.stored_key.items())
        """Whether the folder uses Transformer Engine's names."""
        self.storage = metadata.storage_data
        self._check_chunks()
        dtype = next(iter(tensors.values())).properties.dtype
        super().__init__(model, {k: torch.empty(s, dtype=dtype, device="meta") for k, s in logical_shapes(model).items()})

    def _check_chunks(self) -> None:
        sizes = {}
        for key, entry in self.entries.items():
            stacked = key.startswith("decoder.layers.")
            covered: dict[int, int] = {}
            for chunk in entry.chunks:
                if any(o < 0 or o + s > n for o, s, n in zip(chunk.offsets, chunk.sizes, entry.size)) or (
                        stacked and chunk.sizes[0] != 1):
                    raise CheckpointError(f"{self.folder / METADATA}: tensor {key} has a chunk at "
                                          f"{tuple(chunk.offsets)} of size {tuple(chunk.sizes)} outside its shape")
                info = self.storage.get(self._index(key, chunk))
                if info is None:
                    raise CheckpointError(f"{self.folder / METADATA}: tensor {key}: no storage for the chunk at "
                                          f"{tuple(chunk.offsets)}")
                path = self.folder / info.relative_path
                if path not in sizes:
                    sizes[path] = path.stat().st_size if path.exists() else -1
                if info.offset + info.length > sizes[path]:
                    raise CheckpointError(f"{path}: tensor {key} (chunk at {tuple(chunk.offsets)}) is "
                                          + ("missing: no such file" if sizes[path] < 0 else "truncated"))
                layer = chunk.offsets[0] if stacked else 0
                covered[layer] = covered.get(layer, 0) + chunk.sizes.numel()
            per_layer = entry.size[1:].numel() if stacked else entry.size.numel()
            layers = entry.size[0] if stacked else 1
            wrong = [i for i in range(layers) if covered.get(i, 0) != per_layer]
            if wrong:
                where = f" layer {wrong[0]}" if stacked else ""
                raise CheckpointError(f"{self.folder / METADATA}: tensor {key}{where}: its chunks cover "
                                      f"{covered.get(wrong[0], 0)} of {per_layer} elements")

    def _index(self, key: str, chunk: Any) -> Any:
        return md.MetadataIndex(self.stored_key[key], chunk.offsets)

    def _read_unit(self, unit: int) -> dict[str, torch.Tensor]:
        files: dict[str, Any] = {}
        try:
            source = whole_unit(self.model, unit, mcore_table(self.model), lambda name: self._assemble(name, files))
            return {key: piece for key, _, piece in source.convert(logical_table(self.model), 1, 0)}
        finally:
            for f in files.values():
                f.close()

    def _assemble(self, name: str, files: dict[str, Any]) -> torch.Tensor:
        """The whole-model tensor ``name`` from its chunks (a chunk that is all of it is used as read)."""
        key, layer = sharded_key(name)
        entry = self.entries[key]
        chunks = [c for c in entry.chunks if layer is None or c.offsets[0] == layer]
        out = None
        for chunk in chunks:
            t = self._read_chunk(key, chunk, files)
            piece = t[0] if layer is not None else t
            if len(chunks) == 1:
                return piece
            if out is None:
                out = empty_huge(entry.size[1:] if layer is not None else entry.size, entry.properties.dtype)
            start = chunk.offsets[1:] if layer is not None else chunk.offsets
            out[tuple(slice(o, o + s) for o, s in zip(start, piece.shape))].copy_(piece)
        return out

    def _read_chunk(self, key: str, chunk: Any, files: dict[str, Any]) -> torch.Tensor:
        """One chunk: its ``torch.save`` blob's pickle is read with ``weights_only`` onto ``meta`` (shape,
        dtype, strides; no data), then its one storage record is read straight into a fresh tensor (four
        times faster than ``torch.load``, which checks a CRC and copies)."""
        info = self.storage[self._index(key, chunk)]
        path = self.folder / info.relative_path
        if info.relative_path not in files:
            files[info.relative_path] = open(path, "rb", buffering=0)
        f = files[info.relative_path]
        where = f"{path}: tensor {key} (chunk at {tuple(chunk.offsets)})"
        try:
            t = torch.load(_Window(f, info.offset, info.length), map_location="meta", weights_only=True)
            archive = zip_reader(_Window(f, info.offset, info.length))  # torch.load's zip reader
            records = [r for r in archive.get_all_records() if r.startswith("data/")]
            start = archive.get_record_offset(records[0]) if len(records) == 1 else None
        except Exception as exc:  # torch.load's errors on a damaged blob vary by version
            raise CheckpointError(f"{where} cannot be read: {type(exc).__name__}: {exc}") from exc
        want = self.entries[key].properties.dtype
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(chunk.sizes) or t.dtype != want:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointError(f"{where} holds {got}, expected {tuple(chunk.sizes)} {want}")
        nbytes = t.numel() * t.element_size()
        if start is None or not t.is_contiguous() or t.storage_offset() or start + nbytes > info.length:
            raise CheckpointError(f"{where} is not one contiguous tensor with its own storage")
        out = empty_huge(t.shape, t.dtype)
        view, got = memoryview(out.reshape(-1).view(torch.uint8).numpy()), 0
        f.seek(info.offset + start)
        while got < nbytes:  # one read returns at most 2 GiB
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
        if got != nbytes:
            raise CheckpointError(f"{where} is truncated ({got} of {nbytes} bytes)")
        return out


# -- the format's verbs (``adapter.checkpoint.formats``) -------------------------------------------------------
def detect(names: set[str]) -> bool:
    return "metadata.json" in names and (METADATA in names or any(n.endswith(".distcp") for n in names))


def open_folder(path: Path, model: Optional[ModelConfig]) -> tuple[ModelConfig, None, DistTensors, str]:
    model, tensors = read_torch_dist(path, model)
    return model, None, tensors, "mcore-torch_dist" + (" (Transformer Engine names)" if tensors.renamed else "")


def planned_files(layout: Any) -> list[str]:
    return ["metadata.json", METADATA, DATA_FILE, "common.pt", MODEL_JSON]


def file_groups(model: ModelConfig, layout: Any, meta: Mapping[str, torch.Tensor], shard_bytes: int) -> list[FileGroup]:
    """One data file of layout-free chunks."""
    def entries(unit: Unit) -> Iterator[tuple[int, Item, torch.Tensor]]:
        for item, t in unit_items(unit).items():
            yield 0, item, t

    return [FileGroup([DATA_FILE], list(range(model.num_layers + 2)), entries, OrderedDict,
                      lambda path, items: DistcpWriter(path, items, global_shapes(model),
                                                       extra_state_keys(model.num_layers)))]


def finish(folder: Path, model: ModelConfig, groups: list[FileGroup], meta: Mapping[str, torch.Tensor]) -> None:
    finish_folder(folder, model)
