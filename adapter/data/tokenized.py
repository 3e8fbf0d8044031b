"""InternEvo's tokenized dataset files: ``<name>.bin`` (JSON lines ``{"tokens": [...]}``) and ``<name>.bin.meta``.

The ``.meta`` file is ``np.save`` of an int array with one row per line: column 0 the byte offset of the
line, the last column its token count. A training folder has one sub-folder per data type; type ids are
the sorted sub-folder names' positions, and every ``.bin`` must sit under exactly one of them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A dataset file or folder is malformed; the message names it."""


class TokenizedFile:
    """One ``.bin`` file: random access to its samples, shortest ones dropped (``min_length``).

    Nothing stays open or mapped between reads. The ``.meta`` index is memory-mapped only while it is read
    (whole once, by the packer, for its lengths); a sample is its meta row, read at its place in the file,
    and one ``readline`` at its offset. A lasting mapping would keep 16 bytes a sample of metas, and the page
    of every ``.bin`` line read, in the rank's resident set over a trillion-token run; thousands of files
    would hold as many descriptors. ``vocab_size`` refuses token ids the model's embedding does not have,
    naming the file and the sample's byte offset."""

    def __init__(self, path: str | os.PathLike, type_id: int = 0, min_length: int = 0,
                 vocab_size: int | None = None):
        self.path, self.type_id, self.vocab_size = Path(path), type_id, vocab_size
        self.meta_path = Path(f"{self.path}.meta")
        if not self.meta_path.exists():
            raise DataError(f"{self.meta_path}: missing (every .bin needs its .bin.meta index)")
        meta = self._meta()
        self.kept: np.ndarray | None = None
        """Meta rows of the samples kept by ``min_length`` (``None``: all of them)."""
        if min_length > 0:
            keep = np.flatnonzero(meta[:, -1] >= min_length)
            if len(keep) < len(meta):
                self.kept = keep
        self._len = len(meta) if self.kept is None else len(self.kept)
        self._layout = (meta.offset, meta.strides, meta.dtype, meta.shape[1])
        """Where a meta element lies in the file: data offset, byte strides, dtype, columns."""

    def _meta(self) -> np.ndarray:
        try:
            meta = np.load(self.meta_path, mmap_mode="r")
        except ValueError as exc:
            raise DataError(f"{self.meta_path}: not a numpy array file ({exc})") from None
        if meta.ndim != 2 or meta.shape[1] < 2 or meta.dtype.kind not in "iu":
            raise DataError(f"{self.meta_path}: expected an [N, 2] integer array of (byte offset, token count)")
        return meta

    @property
    def lengths(self) -> np.ndarray:
        """Token counts of the kept samples, as a contiguous int32 copy from a fresh mapping (unmapped on return):
        the packer gathers them in shuffled order, three times faster from 4 bytes a sample than from the
        mapped column of 8."""
        column = self._meta()[:, -1]
        if len(column) and (column.min() < 0 or column.max() >= 2**31):
            raise DataError(f"{self.meta_path}: token counts must lie in [0, 2**31), found "
                            f"{column.min()} to {column.max()}")
        lengths = column.astype(np.int32)
        return lengths if self.kept is None else lengths[self.kept]

    def __len__(self) -> int:
        return self._len

    def _meta_row(self, row: int) -> tuple[int, int]:
        """(byte offset, token count) of one meta row, read from the file (mapping it costs ten times more)."""
        offset, (row_stride, column_stride), dtype, columns = self._layout
        values = []
        with open(self.meta_path, "rb") as f:
            for column in (0, columns - 1):
                f.seek(offset + row * row_stride + column * column_stride)
                values.append(int(np.frombuffer(f.read(dtype.itemsize), dtype)[0]))
        return values[0], values[1]

    def __getitem__(self, index: int) -> dict:
        start, length = self._meta_row(int(index if self.kept is None else self.kept[index]))
        with open(self.path, "rb") as f:
            f.seek(start)
            line = f.readline()
        try:
            tokens = np.array(json.loads(line)["tokens"], dtype=np.int64)
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            raise DataError(f"{self.path}: byte {start}: not a {{\"tokens\": [...]}} line ({exc})") from exc
        if tokens.shape != (length,):
            raise DataError(f"{self.path}: byte {start}: {tokens.size} tokens where {self.meta_path.name} says "
                            f"{length}")
        if self.vocab_size is not None and tokens.size and np.abs(tokens).max() >= self.vocab_size:
            bad = int(tokens[np.abs(tokens) >= self.vocab_size][0])
            raise DataError(f"{self.path}: byte {start}: token id {bad} is outside the model's vocabulary "
                            f"(model.vocab_size={self.vocab_size}); was the data tokenized for another model?")
        return {"tokens": tokens, "type_id": self.type_id}


def write_tokenized(path: str | os.PathLike, samples: list[list[int]]) -> None:
    """Write ``path`` and ``path.meta`` in InternEvo's format, atomically (temporary names, then rename).

    Offsets are stored as int64: InternEvo's own tool writes int32, which overflows past 2 GiB."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, offset = [], 0
    tmp_bin, tmp_meta = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.meta.tmp")
    with open(tmp_bin, "wb") as f:
        for tokens in samples:
            line = (json.dumps({"tokens": [int(t) for t in tokens]}) + "\n").encode()
            f.write(line)
            rows.append((offset, len(tokens)))
            offset += len(line)
    with open(tmp_meta, "wb") as f:
        np.save(f, np.array(rows, dtype=np.int64).reshape(-1, 2))
    os.replace(tmp_bin, path)
    os.replace(tmp_meta, Path(f"{path}.meta"))


def find_files(folder: str | os.PathLike, folder_order: list[str] | None = None) -> list[tuple[Path, int]]:
    """Every ``.bin`` under ``folder`` in InternEvo's order, with its data-type id.

    InternEvo materialises ``os.walk`` before its loop sorts ``dirs``, so the sort never takes effect: folders
    come in the order the filesystem lists them, files within a folder sorted. We keep that order, because it
    decides which rows make up each batch (the fixtures were written with it); it is filesystem-dependent in
    InternEvo too. ``folder_order`` (type-folder names) replays another machine's listing order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: training data folder not found")
    types = sorted(os.listdir(folder))
    found = []
    walk = list(os.walk(folder, followlinks=True))
    if folder_order is not None:
        rank = {name: i for i, name in enumerate(folder_order)}
        walk.sort(key=lambda entry: [rank.get(part, len(rank)) for part in Path(entry[0]).relative_to(folder).parts])
    for root, _dirs, files in walk:
        for name in sorted(files):
            if not name.endswith(".bin"):
                continue
            path = os.path.join(root, name)
            matches = [i for i, key in enumerate(types) if re.search(rf"/[z_]*{re.escape(key)}/", path)]
            if len(matches) != 1:
                raise DataError(f"{path}: must lie under exactly one data-type folder of {folder} "
                                f"(matched {len(matches)} of {types})")
            found.append((Path(path), matches[0]))
    return found
