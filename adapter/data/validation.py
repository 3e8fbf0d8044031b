"""Validation data as InternEvo builds it (``build_valid_loader_with_data_type``).

``valid_folder`` set: every ``.bin`` below it, grouped by the name of the folder that holds it (one
validation set per name), read with InternEvo's validation ``min_length`` of 50. Unset: the synthetic
dataset with ``500 × dp`` samples, named ``val``. Each sample is truncated to ``seq_len``, labelled with the
next token (-100 at the end and for ids <= 0) and padded to ``seq_len``; ranks take every dp-th sample
without shuffling, and a batch holds ``min(valid_micro_num × micro_bsz, len // dp)`` rows, rounded down to a
multiple of ``micro_bsz``; an incomplete last batch is dropped.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from adapter.config.schema import DataConfig
from adapter.data.loader import ConcatRows
from adapter.data.packing import RandomDataset
from adapter.data.tokenized import TokenizedFile

VALID_MIN_LENGTH = 50  # JsonlDataset's constructor default, which InternEvo's validation path keeps


def _datasets(cfg: DataConfig, dp_size: int, vocab_size: int | None) -> dict[str, object]:
    if not cfg.valid_folder:
        return {"val": RandomDataset(dp_size * 500, cfg.seq_len, cfg.fixed_random_dataset_seqlen)}
    groups: dict[str, list] = {}
    for root, _dirs, files in sorted(os.walk(cfg.valid_folder, followlinks=True)):
        for name in sorted(files):
            if name.endswith(".bin"):
                ds = TokenizedFile(Path(root) / name, min_length=VALID_MIN_LENGTH, vocab_size=vocab_size)
                if len(ds):
                    groups.setdefault(os.path.basename(root), []).append(ds)
    return {name: ConcatRows(parts) for name, parts in groups.items()}


def _collate(samples: list[dict], seq_len: int) -> dict:
    ids = torch.zeros(len(samples), seq_len, dtype=torch.int64)
    labels = torch.full((len(samples), seq_len), -100, dtype=torch.int64)
    for row, sample in enumerate(samples):
        tokens = sample["tokens"][:seq_len]
        ids[row, :len(tokens)] = torch.from_numpy(np.abs(tokens))
        labels[row, :len(tokens)] = torch.from_numpy(np.append(np.where(tokens[1:] > 0, tokens[1:], -100), -100))
    return {"input_ids": ids, "labels": labels}


def build_valid_batches(cfg: DataConfig, dp_rank: int, dp_size: int,
                        vocab_size: int | None = None) -> dict[str, list[dict]]:
    """Validation set name → this rank's batches (``input_ids``/``labels`` ``[rows, seq_len]``); ``vocab_size``
    refuses token ids the model does not have (``TokenizedFile``)."""
    out = {}
    for name, ds in _datasets(cfg, dp_size, vocab_size).items():
        n = len(ds)
        per_rank = math.ceil((n - dp_size) / dp_size) if n % dp_size else n // dp_size
        rows = min(cfg.valid_micro_num * cfg.micro_bsz, n // dp_size) // cfg.micro_bsz * cfg.micro_bsz
        if rows == 0:
            continue
        mine = list(range(n))[:per_rank * dp_size][dp_rank::dp_size]
        out[name] = [_collate([ds[i] for i in mine[start:start + rows]], cfg.seq_len)
                     for start in range(0, len(mine) - rows + 1, rows)]
    return out
