"""A config's ``data`` section → the batches one data-parallel rank trains on, in InternEvo's format."""

from __future__ import annotations

from typing import Iterator

import torch

from adapter.config.schema import DataConfig
from adapter.data.packing import PackedIntoOne, PackedWithCut, RandomDataset
from adapter.data.sampler import BatchSampler
from adapter.data.tokenized import TokenizedFile, find_files


class ConcatRows:
    """Rows of several packed datasets, one after the other (torch's ConcatDataset order)."""

    def __init__(self, parts: list):
        self.parts = parts
        self.starts = [0]
        for p in parts:
            self.starts.append(self.starts[-1] + len(p))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> dict:
        for part, start, end in zip(self.parts, self.starts, self.starts[1:]):
            if index < end:
                return part[index - start]
        raise IndexError(index)


def packed_rows(cfg: DataConfig, folder_order: list[str] | None = None):
    """Every packed training row of the config's dataset (synthetic when ``train_folder`` is unset).
    ``folder_order``: see ``tokenized.find_files``."""
    def pack(ds):
        if cfg.pack_sample_into_one:
            return PackedIntoOne(ds, cfg.seq_len, cfg.packed_length)
        return PackedWithCut(ds, cfg.seq_len, cfg.packed_length, cfg.micro_bsz, packed=cfg.use_packed_dataset)

    if cfg.train_folder is None:
        return pack(RandomDataset(1_000_000, cfg.seq_len, cfg.fixed_random_dataset_seqlen))
    parts = []
    for path, type_id in find_files(cfg.train_folder, folder_order):
        ds = TokenizedFile(path, type_id, cfg.min_length)
        if len(ds):
            parts.append(pack(ds))
    return ConcatRows(parts)


def packed_collate(rows: list[dict], packed_length: int) -> dict:
    """InternEvo's ``packed_collate_fn``, with the labels in the same dict: inputs ``abs(token)``, labels
    ``w if w > 0 else -100``; ``cu_seqlens`` stacked when every row has as many pieces, else a list."""
    for row in rows:
        if len(row["tokens"]) != packed_length:
            raise ValueError(f"a packed row has {len(row['tokens'])} tokens, expected {packed_length}")
    cu = [torch.tensor(r["cu_seqlens"], dtype=torch.int32) for r in rows]
    return {
        "input_ids": torch.tensor([[abs(t) for t in r["tokens"]] for r in rows], dtype=torch.int64),
        "cu_seqlens": torch.stack(cu) if len({len(c) for c in cu}) == 1 else cu,
        "indexes": torch.tensor([r["indexes"] for r in rows], dtype=torch.int64),
        "type_ids": torch.tensor([r["type_ids"] for r in rows], dtype=torch.int64),
        "labels": torch.tensor([[w if w > 0 else -100 for w in r["labels"]] for r in rows], dtype=torch.int64),
    }


def build_train_batches(cfg: DataConfig, dp_rank: int, dp_size: int, sampler_state: dict | None = None,
                        folder_order: list[str] | None = None) -> tuple[BatchSampler, Iterator[tuple[int, dict]]]:
    """The sampler (for checkpoints) and an endless iterator of ``(batch_count, batch)`` for this rank."""
    rows = packed_rows(cfg, folder_order)
    sampler = BatchSampler(len(rows), cfg.micro_num, cfg.rampup_batch_size, cfg.seed, dp_rank, dp_size)
    if sampler_state is not None:
        sampler.load_state_dict(sampler_state)

    def batches() -> Iterator[tuple[int, dict]]:
        for indices in sampler:
            yield sampler.batch_count - 1, packed_collate([rows[i] for i in indices], cfg.packed_length)

    return sampler, batches()
