"""InternEvo's tokenized dataset files: ``<name>.bin`` (JSON lines ``{"tokens": [...]}``) and ``<name>.bin.meta``.

The ``.meta`` file is ``np.save`` of an int array with one row per line: column 0 the byte offset of the
line, the last column its token count. A training folder has one sub-folder per data type; type ids are
the sorted sub-folder names' positions, and every ``.bin`` must sit under exactly one of them.
"""

from __future__ import annotations

import json
import mmap
import os
import re
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A dataset file or folder is malformed; the message names it."""


class TokenizedFile:
    """One ``.bin`` file: random access to its samples, shortest ones dropped (``min_length``)."""

    def __init__(self, path: str | os.PathLike, type_id: int = 0, min_length: int = 0):
        self.path = Path(path)
        self.type_id = type_id
        meta_path = Path(f"{self.path}.meta")
        if not meta_path.exists():
            raise DataError(f"{meta_path}: missing (every .bin needs its .bin.meta index)")
        meta = np.load(meta_path)
        if meta.ndim != 2 or meta.shape[1] < 2:
            raise DataError(f"{meta_path}: expected an [N, 2] array of (byte offset, token count)")
        self.offsets = meta[:, 0].astype(np.int64)
        self.lengths = meta[:, -1].astype(np.int64)
        if min_length > 0:
            keep = self.lengths >= min_length
            self.offsets, self.lengths = self.offsets[keep], self.lengths[keep]
        self._map = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> dict:
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        start = int(self.offsets[index])
        end = self._map.find(b"\n", start)
        line = self._map[start:end if end >= 0 else len(self._map)]
        try:
            tokens = json.loads(line)["tokens"]
        except (ValueError, KeyError) as exc:
            raise DataError(f"{self.path}: byte {start}: not a {{\"tokens\": [...]}} line ({exc})") from exc
        return {"tokens": tokens, "type_id": self.type_id}

    def __getstate__(self) -> dict:  # mmap objects do not pickle (data-loader workers)
        return {**self.__dict__, "_map": None}


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
