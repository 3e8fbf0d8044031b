"""A config's ``data`` section → the batches one data-parallel rank trains on, in InternEvo's format."""

from __future__ import annotations

import bisect
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from adapter.config.schema import DataConfig
from adapter.data.packing import PackedIntoOne, PackedWithCut, RandomDataset
from adapter.data.sampler import BatchSampler
from adapter.data.tokenized import DataError, TokenizedFile, find_files


class ConcatRows:
    """Rows of several datasets, one after the other (torch's ConcatDataset order), found by binary search
    over the parts' first rows so that thousands of files cost nothing per row."""

    def __init__(self, parts: list):
        self.parts = parts
        self.starts = [0]
        for p in parts:
            self.starts.append(self.starts[-1] + len(p))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = bisect.bisect_right(self.starts, index) - 1
        return self.parts[part][index - self.starts[part]]


def packed_rows(cfg: DataConfig, folder_order: list[str] | None = None, vocab_size: int | None = None):
    """Every packed training row of the config's dataset (synthetic when ``train_folder`` is unset).
    ``folder_order``: see ``tokenized.find_files``; ``vocab_size``: see ``tokenized.TokenizedFile``."""
    def pack(ds):
        if cfg.pack_sample_into_one:
            return PackedIntoOne(ds, cfg.seq_len, cfg.packed_length)
        return PackedWithCut(ds, cfg.seq_len, cfg.packed_length, cfg.micro_bsz, packed=cfg.use_packed_dataset)

    if cfg.train_folder is None:
        return pack(RandomDataset(1_000_000, cfg.seq_len, cfg.fixed_random_dataset_seqlen))
    files = find_files(cfg.train_folder, folder_order)
    if not files:
        raise DataError(f"{cfg.train_folder}: the training data folder holds no data (no .bin files in its "
                        f"data-type folders)")
    parts = []
    for path, type_id in files:
        ds = TokenizedFile(path, type_id, cfg.min_length, vocab_size)
        if len(ds):
            parts.append(pack(ds))
    if not parts:
        kept = f" of at least data.min_length={cfg.min_length} tokens" if cfg.min_length else ""
        raise DataError(f"{cfg.train_folder}: the training data folder holds no data: its {len(files)} .bin "
                        f"files hold no samples{kept}")
    return ConcatRows(parts)


def packed_collate(rows: list[dict], packed_length: int) -> dict:
    """InternEvo's ``packed_collate_fn``, with the labels in the same dict: inputs ``abs(token)``, labels
    ``w if w > 0 else -100``; ``cu_seqlens`` stacked when every row has as many pieces, else a list."""
    for row in rows:
        if len(row["tokens"]) != packed_length:
            raise ValueError(f"a packed row has {len(row['tokens'])} tokens, expected {packed_length}")
    cu = [torch.from_numpy(r["cu_seqlens"]) for r in rows]
    labels = np.stack([r["labels"] for r in rows])
    return {
        "input_ids": torch.from_numpy(np.abs(np.stack([r["tokens"] for r in rows]))),
        "cu_seqlens": torch.stack(cu) if len({len(c) for c in cu}) == 1 else cu,
        "indexes": torch.from_numpy(np.stack([r["indexes"] for r in rows])),
        "type_ids": torch.from_numpy(np.stack([r["type_ids"] for r in rows])),
        "labels": torch.from_numpy(np.where(labels > 0, labels, -100)),
    }


class CollatedBatches:
    """Batches by their row indices: what each data-loader worker process computes, and the main process
    without workers.

    A ``DataError`` (a malformed file, a token outside the vocabulary) is returned, not raised: raised in a
    worker, it would reach the training process as the worker's whole traceback in one message instead of
    the line that names the file."""

    def __init__(self, rows, packed_length: int):
        self.rows, self.packed_length = rows, packed_length

    def __getitem__(self, indices: list[int]) -> dict | DataError:
        try:
            return packed_collate([self.rows[i] for i in indices], self.packed_length)
        except DataError as exc:
            return exc


def build_train_batches(cfg: DataConfig, dp_rank: int, dp_size: int, sampler_state: dict | None = None,
                        folder_order: list[str] | None = None, *, vocab_size: int | None = None,
                        num_workers: int = 0) -> tuple[BatchSampler, Iterator[tuple[int, dict]]]:
    """The sampler (for checkpoints) and an endless iterator of ``(batch_count, batch)`` for this rank.

    With ``num_workers`` > 0, that many ``DataLoader`` worker processes read and collate the batches of a
    look-ahead copy of the sampler, in its order; the returned sampler advances one batch per batch handed
    out, so its state (what a checkpoint saves) is exactly that of the batches trained on, however far the
    workers have read ahead (each epoch's shuffle of the row indices then runs in both). ``vocab_size``:
    refuse token ids the model does not have (``TokenizedFile``)."""
    rows = packed_rows(cfg, folder_order, vocab_size)
    sampler = BatchSampler(len(rows), cfg.micro_num, cfg.rampup_batch_size, cfg.seed, dp_rank, dp_size,
                           state=sampler_state)
    collated = CollatedBatches(rows, cfg.packed_length)

    def batches() -> Iterator[tuple[int, dict]]:
        if num_workers > 0:
            # batch_size=None: each item the look-ahead sampler yields is one batch's list of row indices
            loader = DataLoader(collated, sampler=sampler.lookahead(), batch_size=None, num_workers=num_workers)
            pairs = zip(sampler, loader)
        else:
            pairs = ((indices, collated[indices]) for indices in sampler)
        for _indices, batch in pairs:
            if isinstance(batch, DataError):
                break
            yield sampler.batch_count - 1, batch
        # the stream is endless: only a DataError gets here. Stop the workers before raising it, as its
        # traceback holds this frame; shut down later by the garbage collector, they took 5 s each to go
        del pairs
        raise batch

    return sampler, batches()
