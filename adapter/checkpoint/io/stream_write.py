"""Write checkpoint files whose tensors arrive one at a time, so a converter never holds a whole file.

Two formats, both byte-compatible with what their own libraries write:

* ``TorchFileWriter``: a ``torch.save`` zip file. ``torch.save`` needs every tensor in memory at once;
  this writer takes the file's structure up front (the nested dicts with ``torch.empty(..., device="meta")``
  placeholders for shapes and dtypes), pickles it exactly as ``torch.save`` does (``data.pkl`` is
  byte-identical; a test checks it), and then writes each tensor's bytes as its record when it arrives.
  Records go through torch's own zip writer (``torch._C.PyTorchFileWriter``, what ``torch.save`` uses), so
  alignment, CRCs and the archive name are torch's. ``torch.load`` on any torch ≥ 1.6 reads the result.
* ``SafetensorsWriter``: a safetensors file (header of names, dtypes, shapes and offsets, then the raw
  bytes in order), the layout ``safetensors.torch.save_file`` produces, written tensor by tensor.

Both check that every tensor arrives in order with the announced shape and dtype, and that none is missing.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import struct
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from adapter.checkpoint.io.memory import empty_huge
from adapter.checkpoint.io.torch_private import rebuild_tensor, storage_alignment, storage_type, zip_writer

#: safetensors' dtype names
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(dotted name, tensor)`` for the tensors of a nested dict/list structure, in the order pickling meets
    them (a file's record order)."""
    if isinstance(obj, torch.Tensor):
        yield prefix.rstrip(".") or "<tensor>", obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from leaves(value, f"{prefix}{key}.")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from leaves(value, f"{prefix}{i}.")


class _Storage:
    """Stands in for a tensor's storage in the pickle (``torch.save`` writes a persistent id for it)."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    """Pickles as ``torch.save`` pickles a contiguous CPU tensor with its own storage."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol: int) -> tuple:
        stride = torch.empty(self.shape, device="meta").stride()
        return rebuild_tensor(), (self.storage, 0, self.shape, stride, False, OrderedDict())


def _swap(obj: Any, storages: list[_Storage]) -> Any:
    """``obj`` with each placeholder tensor replaced by a ``_Tensor`` (numbered as ``torch.save`` numbers)."""
    if isinstance(obj, torch.Tensor):
        storage = _Storage(str(len(storages)), obj.dtype, obj.numel())
        storages.append(storage)
        return _Tensor(storage, tuple(obj.shape))
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, _swap(v, storages)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _swap(v, storages) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_swap(v, storages) for v in obj)
    return obj


def _pickle(skeleton: Any) -> tuple[bytes, list[_Storage]]:
    storages: list[_Storage] = []
    swapped = _swap(skeleton, storages)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            if isinstance(obj, _Storage):
                return "storage", storage_type(obj.dtype), obj.key, "cpu", obj.numel
            return None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(swapped)
    return buffer.getvalue(), storages


class Ordered:
    """Shared bookkeeping: the announced tensors, and which comes next."""

    def __init__(self, path: Path, expected: list[tuple[str, tuple[int, ...], torch.dtype]]):
        self.path, self.expected, self.next = path, expected, 0

    def _check(self, tensor: torch.Tensor, position: Optional[int]) -> torch.Tensor:
        if self.next >= len(self.expected):
            raise ValueError(f"{self.path}: more tensors than announced")
        name, shape, dtype = self.expected[self.next]
        if position is not None and position != self.next:
            raise ValueError(f"{self.path}: tensor #{position} given while #{self.next} ({name}) is due")
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{self.path}: tensor {name} has shape {tuple(tensor.shape)} {tensor.dtype}, "
                             f"expected {shape} {dtype}")
        self.next += 1
        tensor = tensor.detach().cpu()
        return tensor if tensor.is_contiguous() else empty_huge(tensor.shape, tensor.dtype).copy_(tensor)

    def abort(self) -> None:
        """Let the file go after a failure, without raising (the folder it is in is deleted anyway)."""

    def _check_complete(self) -> None:
        if self.next != len(self.expected):
            missing = ", ".join(name for name, _, _ in self.expected[self.next:self.next + 3])
            raise ValueError(f"{self.path}: closed before every tensor was written (next: {missing})")


class TorchFileWriter(Ordered):
    """A ``torch.save`` file of ``skeleton``, whose tensors are then given one by one with ``write``."""

    def __init__(self, path: Path, skeleton: Any):
        super().__init__(path, [(n, tuple(t.shape), t.dtype) for n, t in leaves(skeleton)])
        data, self.storages = _pickle(skeleton)
        self.zip = zip_writer(str(path))
        # the records torch.save writes before the tensor data, in its order
        self.zip.write_record("data.pkl", data, len(data))
        self.zip.write_record(".format_version", "1", 1)
        alignment = storage_alignment()
        if alignment is not None:
            self.zip.write_record(".storage_alignment", alignment, len(alignment))
        self.zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))

    def write(self, tensor: torch.Tensor, position: Optional[int] = None) -> None:
        """The next tensor (``position``, when given, must be its index in the file's order)."""
        tensor = self._check(tensor, position)
        key = self.storages[self.next - 1].key
        nbytes = tensor.numel() * tensor.element_size()
        start = tensor.storage_offset() * tensor.element_size()
        data = tensor.untyped_storage()[start:start + nbytes]  # a view of just this tensor's bytes
        self.zip.write_record(f"data/{key}", data, nbytes)

    def reserve(self) -> None:
        """Leave the next tensor's record unwritten, its space reserved (``shared_write`` fills it)."""
        name, shape, dtype = self.expected[self.next]
        self.next += 1
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        self.zip.write_record_metadata(f"data/{self.storages[self.next - 1].key}", nbytes)

    def close(self) -> None:
        self._check_complete()
        self.zip.write_end_of_file()

    def abort(self) -> None:
        # torch marks the writer finished even when this raises; otherwise its destructor would write the end
        # again, fail again (a full disk) and, throwing from a C++ destructor, kill the process (std::terminate)
        try:
            self.zip.write_end_of_file()
        except RuntimeError:
            pass


def save_tensors(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)`` of nested dicts/lists of tensors that may be views of larger buffers.

    ``torch.save`` stores a view's whole storage, so a caller holding views of a flat buffer (DeepSpeed keeps
    parameters and optimizer state that way) would first have to copy each one; here each tensor becomes a
    record of its own bytes, as if it had been copied, and ``torch.load`` gives the same tensors back.
    """
    writer = TorchFileWriter(path, obj)
    try:
        for _, tensor in leaves(obj):
            writer.write(tensor)
        writer.close()
    except BaseException:
        writer.abort()
        raise


class SafetensorsWriter(Ordered):
    """A safetensors file of ``tensors`` (name → meta placeholder, in file order), filled with ``write``."""

    def __init__(self, path: Path, tensors: "OrderedDict[str, torch.Tensor]", metadata: dict[str, str] | None = None):
        super().__init__(path, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()])
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors pads it
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, tensor: torch.Tensor, position: Optional[int] = None) -> None:
        """The next tensor (``position``, when given, must be its index in the file's order)."""
        tensor = self._check(tensor, position)
        self.file.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))

    def close(self) -> None:
        self._check_complete()
        self.file.close()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
