"""A ``torch.save`` file whose tensors several processes write side by side, each the ones it holds.

ZeRO spreads a parameter's optimizer state over the data-parallel ranks, and a checkpoint file holds whole
tensors: sending every part to one rank to write costs as much as writing it (DeepSpeed sidesteps this by
writing each rank's flat partition, which only that layout can read back). Here the file is written where the
parts are, in three steps:

1. ``reserve``: one process creates the file with every tensor's record reserved and left unwritten (torch's own
   zip writer, as ``torch.serialization.skip_data`` uses it: a sparse file whose structure is final) and gets
   where each record's bytes go;
2. ``write_records``: each process writes the bytes of its tensors, or of rows of a tensor, in place
   (``os.pwrite``) and returns their CRC-32s;
3. ``seal``: the creator writes each record's CRC (``whole_crc`` combines its parts') where the zip format keeps
   them (each record's data descriptor and central-directory entry) and the serialization id torch derives
   from every record's CRC.

The result is byte for byte the file ``torch.save`` writes of the same tensors (a test holds it to that), so
every reader, torch's or InternEvo's, reads it as one. The processes must see one file system (a shared one
across nodes); the creator renames the file into place once everything is sealed.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
# zlib's CRC-32, 4x faster than the zlib module's (Intel ISA-L), and zlib's crc32_combine, which the module lacks
from isal.isal_zlib import crc32, crc32_combine

from adapter.checkpoint.io.stream_write import TorchFileWriter, leaves

_DESCRIPTOR = b"PK\x07\x08"
_CENTRAL = b"PK\x01\x02"
_SERIALIZATION_ID = ".data/serialization_id"
_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class Part:
    """Bytes ``offset:offset + size`` of record ``index`` as one process wrote them, and their CRC-32."""

    index: int
    offset: int
    size: int
    crc: int


@dataclass(frozen=True)
class Record:
    """A zip record: where its bytes start, how many, and where its central-directory entry starts."""

    name: str
    data: int
    size: int
    central: int


@dataclass(frozen=True)
class Reserved:
    """What ``reserve`` wrote: the file's size, its bytes outside the tensors' records (``regions``: the zip
    structure and the pickle), where each tensor's bytes go (``places``, in the order ``stream_write.leaves``
    lists the tensors) and its records. The same for every file of the same skeleton and name."""

    size: int
    regions: tuple[tuple[int, bytes], ...]
    places: list[int]
    records: list[Record]


#: ``Reserved`` by (file name, skeleton's names, shapes and dtypes): a training run writes the same files at
#: every save, and torch's writer costs milliseconds a file (the pickle, the zip structure, reading it back)
_RESERVED: "OrderedDict[tuple, Reserved]" = OrderedDict()
_RESERVED_KEPT = 64


def reserve(path: Path, skeleton: Any) -> Reserved:
    """Create ``path``, the ``torch.save`` file of ``skeleton`` (nested dicts/lists of placeholder tensors, e.g.
    on the ``meta`` device) with no tensor bytes written (a sparse file); returns where everything is."""
    key = (path.name, tuple((name, tuple(t.shape), t.dtype) for name, t in leaves(skeleton)))
    reserved = _RESERVED.get(key)
    if reserved is None:
        reserved = _reserve(path, skeleton)
        _RESERVED[key] = reserved
        if len(_RESERVED) > _RESERVED_KEPT:
            _RESERVED.popitem(last=False)
    else:  # the bytes torch's writer would write again
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.ftruncate(fd, reserved.size)
            for offset, data in reserved.regions:
                os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
    return reserved


def _reserve(path: Path, skeleton: Any) -> Reserved:
    """``reserve`` through torch's own zip writer."""
    writer = TorchFileWriter(path, skeleton)
    try:
        for _ in writer.expected:
            writer.reserve()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    records = _records(path)
    by_name = {r.name.partition("/")[2]: r for r in records}
    tensors = [by_name[f"data/{storage.key}"] for storage in writer.storages]
    size, regions, start = path.stat().st_size, [], 0
    with open(path, "rb") as f:
        for r in sorted(tensors, key=lambda r: r.data) + [Record("", size, 0, size)]:
            f.seek(start)
            regions.append((start, f.read(r.data - start)))
            start = r.data + r.size
    return Reserved(size, tuple(regions), [r.data for r in tensors], records)


def write_records(path: Path, places: Mapping[int, int], parts: Iterable[tuple[int, int, torch.Tensor]]) -> list[Part]:
    """Write each ``(i, offset, tensor)`` of ``parts`` (host memory; copied first where it is not contiguous):
    ``tensor``'s bytes at byte ``offset`` of record ``i``, which starts at byte ``places[i]`` of ``path``.
    Returns each part's ``Part``, CRC-32 included; a tensor written whole is the part at offset 0."""
    out = []
    fd = os.open(path, os.O_WRONLY)
    try:
        for i, offset, tensor in parts:
            data = _bytes(tensor)
            at, done = places[i] + offset, 0
            while done < len(data):  # one write moves at most ~2 GiB on Linux
                done += os.pwrite(fd, data[done:], at + done)
            out.append(Part(i, offset, len(data), crc32(data)))
    finally:
        os.close(fd)
    return out


def whole_crc(parts: Iterable[Part], size: int) -> int:
    """The CRC-32 of a record of ``size`` bytes written as ``parts`` (``write_records``' answers for it, in any
    order), or ValueError where they do not cover it exactly once."""
    crc, end = 0, 0
    for part in sorted(parts, key=lambda p: p.offset):
        if part.offset != end:
            break
        crc, end = crc32_combine(crc, part.crc, part.size), end + part.size
    else:
        if end == size:
            return crc
    spans = sorted((p.offset, p.offset + p.size) for p in parts)
    raise ValueError(f"bytes {spans} of {size}")


def seal(path: Path, crcs: Mapping[int, int], reserved: Reserved) -> None:
    """Write the CRC-32 of every tensor (``crcs[i]``; ``whole_crc`` of its parts) into ``path``, which
    ``reserve`` made as ``reserved``, and the serialization id torch computes from them."""
    records = reserved.records
    data = [r for r in records if r.name.partition("/")[2].startswith("data/")]
    if sorted(crcs) != list(range(len(data))):
        raise ValueError(f"{path}: CRCs of tensors {sorted(crcs)[:5]}… given for {len(data)} records")
    with open(path, "r+b") as f:
        values = {}
        for r in records:
            f.seek(r.central + 16)
            values[r.name] = struct.unpack("<I", f.read(4))[0]
        for r in data:
            values[r.name] = crcs[int(r.name.rpartition("/")[2])]
            if r.size:  # an empty record has no descriptor, and its CRC is already crc32(b"") = 0
                _write_crc(f, r, values[r.name])
        last = records[-1]
        if last.name.endswith("/" + _SERIALIZATION_ID):
            # torch: 20 digits hashing the record names (unchanged), then 20 folding the CRCs of every
            # record before it but the empty ones
            f.seek(last.data)
            names = f.read(20)
            folded = 0
            for r in (r for r in records[:-1] if r.size):
                folded = (folded ^ (values[r.name] + 0x9E3779B9 + (folded << 6) + (folded >> 2))) & _MASK
            serialization_id = names + b"%020d" % folded
            if len(serialization_id) != last.size:
                raise ValueError(f"{path}: a {last.size}-byte serialization id, expected 40")
            f.seek(last.data)
            f.write(serialization_id)
            _write_crc(f, last, crc32(serialization_id))


def _write_crc(f, record: Record, crc: int) -> None:
    """``crc`` into ``record``'s data descriptor (torch's writer puts one after every record) and its
    central-directory entry."""
    f.seek(record.data + record.size)
    if f.read(4) != _DESCRIPTOR:
        raise ValueError(f"{f.name}: record {record.name} has no data descriptor where torch's writer puts it")
    f.write(struct.pack("<I", crc))
    f.seek(record.central + 16)
    f.write(struct.pack("<I", crc))


def _records(path: Path) -> list[Record]:
    """Every record of the zip file ``path``, in file order."""
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        infos = z.infolist()
        central = z.start_dir  # where the central directory starts (zip64 resolved)
        out = []
        for info in infos:
            f.seek(info.header_offset + 26)
            name_length, extra_length = struct.unpack("<HH", f.read(4))
            f.seek(central)
            head = f.read(46)
            if head[:4] != _CENTRAL:
                raise ValueError(f"{path}: unexpected central directory at byte {central}")
            out.append(Record(info.filename, info.header_offset + 30 + name_length + extra_length,
                              info.file_size, central))
            central += 46 + sum(struct.unpack("<HHH", head[28:34]))
    return out


def _bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of ``tensor`` in host memory, without a copy where it is contiguous (a matrix's columns are
    copied: written a row at a time, the embedding's ``Rows`` of 1-4 KiB rows cost more in Python than the
    copy)."""
    tensor = tensor.detach().cpu()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
