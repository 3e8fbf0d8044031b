"""Load checkpoint files without executing anything they contain.

Model files are plain tensors and load with ``torch.load(weights_only=True)`` (memory-mapped, so a reader
only pages in the tensors it touches). InternEvo's ``model_config.pt`` is a pickled
``internlm...Config`` (a ``dict`` subclass holding a ``torch.dtype``), which ``weights_only`` refuses; it is
read with an unpickler that resolves exactly an allow-list of names (that ``Config`` as a plain ``dict``,
torch dtypes, ``OrderedDict``) and refuses every other global, so a malicious pickle fails instead of
running code. A ``torch_dist`` folder's ``.metadata`` (a plain pickle of PyTorch's distributed-checkpoint
``Metadata``) is read the same way, with DCP's metadata classes as the allow-list.
"""

from __future__ import annotations

import collections
import functools
import importlib
import os
import pickle
import re
import types
from pathlib import Path
from typing import Any, Optional

import torch

from adapter.checkpoint.errors import CheckpointError
from adapter.checkpoint.io import mapped

_DTYPES = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64", "half", "float")}


class _InternEvoConfig(dict):
    """What ``internlm.core.context.parallel_context.Config`` is read as."""


_ALLOWED = {
    ("internlm.core.context.parallel_context", "Config"): _InternEvoConfig,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): dtype for name, dtype in _DTYPES.items()},
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file asked to load a name outside the allow-list."""


class _Unpickler(pickle.Unpickler):
    allowed: dict[tuple[str, str], Any] = _ALLOWED
    what = "objects InternEvo stores in checkpoint metadata"

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(f"refusing to load {module}.{name}: not on the allow-list of "
                                        f"{self.what}") from None


#: what a DCP ``.metadata`` pickle may name (megatron-core's saves also keep their save plans in it)
_DCP_NAMES = {
    "torch.distributed.checkpoint.metadata": ("Metadata", "MetadataIndex", "TensorStorageMetadata",
                                              "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo",),
    "torch.distributed.checkpoint.planner": ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"),
    "torch.serialization": ("_get_layout",),
    "torch": ("Size",),
}


@functools.cache
def _dcp_allowed() -> dict[tuple[str, str], Any]:
    names: dict[tuple[str, str], Any] = {("torch", n): v for n, v in vars(torch).items() if isinstance(v, torch.dtype)}
    names[("collections", "OrderedDict")] = collections.OrderedDict
    for module, members in _DCP_NAMES.items():
        imported = importlib.import_module(module)
        names.update({(module, m): getattr(imported, m) for m in members if hasattr(imported, m)})
    return names


class _DcpUnpickler(_Unpickler):
    what = "PyTorch distributed-checkpoint metadata classes"

    def __init__(self, file: Any):
        super().__init__(file)
        self.allowed = _dcp_allowed()


_pickle_module = types.ModuleType("adapter_safe_pickle")
_pickle_module.Unpickler = _Unpickler  # type: ignore[attr-defined]
_pickle_module.load = pickle.load  # type: ignore[attr-defined]
_pickle_module.__name__ = "adapter_safe_pickle"


def load_tensors(path: str | os.PathLike, *, mmap: bool = True, megatron: bool = False) -> dict[str, Any]:
    """A model file: tensors only, memory-mapped. ``megatron``: a ``model_optim_rng.pt`` as Megatron-LM
    writes it, whose other entries hold a few more kinds of object (``megatron_globals``)."""
    if not megatron:
        loaded = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=mmap)
    else:
        # megatron-core's enums cost 3 s of imports: only for files that name one (ours never do)
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        allowed = megatron_globals() + (megatron_enums() if any(n.startswith("megatron.") for n in names) else [])
        with torch.serialization.safe_globals(allowed):
            loaded = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=mmap)
    if mmap and isinstance(loaded, dict):
        mapped.track(loaded, path)  # copies out of it read the file (``mapped.copy``)
    return loaded


def load_tensors_like(path: str | os.PathLike, like_path: str | os.PathLike,
                      like: dict[str, Any]) -> Optional[dict[str, torch.Tensor]]:
    """``load_tensors(path)`` without unpickling, for a file that ``torch.save`` wrote with the structure of
    ``like_path`` (the sibling files of a checkpoint's optimizer states: one writer, one layout), whose
    ``load_tensors`` gave ``like``; None where anything differs (then ``load_tensors`` it).

    Unpickling is most of what opening a file costs (torch's weights-only reader interprets the pickle in
    Python: about 5 ms for 64 tensors). Here the file's pickled structure (``data.pkl``) must be byte for byte
    the sibling's, which that reader accepted, and every record must lie where the sibling's does (found
    by reading each record's header, as ``torch.load`` does); then each tensor is the sibling's, over this
    file's bytes, memory-mapped like ``torch.load(mmap=True)``'s."""
    if not all(type(t) is torch.Tensor and t.device.type == "cpu" for t in like.values()):
        return None
    size = os.path.getsize(path)
    if size != os.path.getsize(like_path):
        return None
    mine, theirs = (torch._C.PyTorchFileReader(os.fspath(p)) for p in (path, like_path))
    records = theirs.get_all_records()
    if sorted(mine.get_all_records()) != sorted(records):
        return None
    storages = {}  # offset in the file → size, of each record that holds a storage
    for name in records:
        at = mine.get_record_offset(name)
        if at != theirs.get_record_offset(name) or mine.get_record_size(name) != theirs.get_record_size(name):
            return None
        if name.startswith("data/"):
            storages[at] = mine.get_record_size(name)
        elif name != ".data/serialization_id" and mine.get_record(name) != theirs.get_record(name):
            return None  # the pickle, the byte order, the format's version
    # each of the sibling's storages is its mapping's bytes at its record (``torch.load(mmap=True)``), one
    # storage a record: the lowest lies at the lowest record, which gives the mapping's address of byte 0
    starts = {t.untyped_storage().data_ptr() for t in like.values()}
    if not starts or len(starts) != len(storages):
        return None
    base = min(starts) - min(storages)
    whole = torch.UntypedStorage.from_file(os.fspath(path), False, size)
    loaded = {}
    for key, t in like.items():
        at, n = t.untyped_storage().data_ptr() - base, t.untyped_storage().nbytes()
        if storages.get(at, -1) < n:
            return None
        loaded[key] = torch.empty((0,), dtype=t.dtype).set_(whole[at:at + n], t.storage_offset(), t.shape, t.stride())
    mapped.track(loaded, path, base=whole.data_ptr())
    return loaded


@functools.cache
def megatron_globals() -> list[Any]:
    """What Megatron-LM's own legacy checkpoint files hold besides tensors, numbers and strings: ``args`` (an
    ``argparse.Namespace``, with megatron-core enums such as ``ModelType`` and ``AttnBackend`` among its
    values: ``megatron_enums``), the numpy RNG state (an ``ndarray``), and Transformer Engine's
    ``_extra_state`` (``io.BytesIO`` in older TE). All are plain data: constructing them runs no code of the
    file's choosing."""
    import argparse
    import io

    import numpy

    multiarray = getattr(numpy, "_core", None) or numpy.core
    names: list[Any] = [argparse.Namespace, io.BytesIO, numpy.ndarray, numpy.dtype,
                        multiarray.multiarray._reconstruct]
    return names + [type(numpy.dtype(code)) for code in ("u4", "i8", "f8", "f4")]


@functools.cache
def megatron_enums() -> list[Any]:
    """megatron-core's enums (``ModelType``, ``AttnBackend``, …), which Megatron-LM's ``args`` hold."""
    import enum

    names: list[Any] = []
    for module in ("megatron.core.enums", "megatron.core.transformer.enums"):
        try:
            imported = importlib.import_module(module)
        except ImportError:
            continue
        names += [v for v in vars(imported).values()
                  if isinstance(v, type) and issubclass(v, enum.Enum) and v.__module__ == module]
    return names


def load_metadata(path: str | os.PathLike) -> Any:
    """A small InternEvo metadata file (``model_config.pt``, ``*.step``, ``context.pt``) through the allow-list.

    ``Config`` objects come back as plain dicts."""
    obj = torch.load(Path(path), map_location="cpu", weights_only=False, pickle_module=_pickle_module)
    return _plain(obj)


def load_dcp_metadata(path: str | os.PathLike) -> Any:
    """A ``torch_dist`` folder's ``.metadata`` (PyTorch DCP ``Metadata``) through its allow-list."""
    with open(path, "rb") as f:
        return _DcpUnpickler(f).load()


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def load_deepspeed_file(path: str | os.PathLike, map_location: Any = None) -> Any:
    """DeepSpeed's own checkpoint files, with ``weights_only=True`` and the three DeepSpeed classes its ZeRO
    optimizer files hold allow-listed (DeepSpeed itself loads them with ``weights_only=False``)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def open_model_file(path: Path, megatron: bool = False) -> Any:
    """A model file, memory-mapped and read with ``weights_only=True``; any failure names the file.
    ``megatron``: Megatron-LM's ``model_optim_rng.pt``, with its few kinds of non-tensor object allowed."""
    try:
        return load_tensors(path, megatron=megatron)
    except Exception as exc:
        refused = re.search(r"GLOBAL (\S+)", str(exc)) if isinstance(exc, pickle.UnpicklingError) else None
        if refused:  # torch's message goes on to suggest weights_only=False, which is not advice to pass on
            raise CheckpointError(f"{path}: cannot be read: it asks to load {refused[1]}, which is neither a "
                                  "tensor nor on the allow-list (refused, not run)") from exc
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({type(exc).__name__}: {exc})") from exc
