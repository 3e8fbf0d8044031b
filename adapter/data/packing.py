"""Packing samples into InternEvo's training rows of ``packed_length = micro_bsz * seq_len`` tokens.

Per source file, samples are shuffled with ``RandomState(1024)`` and their token stream is cut into
consecutive ``packed_length`` windows (``PackedWithCut``). Inside a window every sample fragment is split
into pieces of at most ``seq_len`` tokens: ``cu_seqlens`` marks every piece, ``indexes`` (positions) restart
per piece, and labels are the next token within the sample (-100 after its last token; at a window end
that cuts a sample, the label is the sample's next token). ``pack_sample_into_one`` uses fixed ``seq_len``
pieces that ignore sample boundaries (``PackedIntoOne``). With ``use_packed_dataset=False`` a row holds
``micro_bsz`` whole samples (truncated to ``seq_len``) padded with zeros (``PackedWithCut.unpacked``).
"""

from __future__ import annotations

import bisect
import itertools

import numpy as np

SEED = 1024  # InternEvo's DEFAULT_SEED for the per-file shuffle


class PackedWithCut:
    def __init__(self, dataset, seq_len: int, packed_length: int, micro_bsz: int, packed: bool = True):
        self.dataset, self.seq_len, self.packed_length = dataset, seq_len, packed_length
        self.micro_bsz, self.packed = micro_bsz, packed
        lengths = np.asarray(dataset.lengths)
        self.order = np.arange(len(lengths))
        np.random.RandomState(SEED).shuffle(self.order)
        self.shuffled_lengths = [int(lengths[i]) for i in self.order]
        self.ends = list(itertools.accumulate(self.shuffled_lengths))
        self.num_tokens = int(lengths.sum())

    def __len__(self) -> int:
        return self.num_tokens // self.packed_length

    def __getitem__(self, index: int) -> dict:
        return self._pack(index) if self.packed else self._unpack(index)

    def _locate(self, window_end: int) -> int:
        """Position (in shuffled order) of the sample holding token ``window_end - 1``."""
        return bisect.bisect_left(self.ends, window_end)

    def _pieces(self, out: dict, chunk: list[int]) -> None:
        full, left = divmod(len(chunk), self.seq_len)
        for n in [self.seq_len] * full + ([left] if left else []):
            out["cu_seqlens"].append(out["cu_seqlens"][-1] + n)
            out["indexes"].extend(range(n))

    def _pack(self, index: int) -> dict:
        start_pos, start_tok = 0, 0
        if index > 0:
            start_pos = self._locate(index * self.packed_length)
            start_tok = self.shuffled_lengths[start_pos] - (self.ends[start_pos] - index * self.packed_length)
            if start_tok == self.shuffled_lengths[start_pos]:
                start_pos, start_tok = start_pos + 1, 0
        end_pos = self._locate((index + 1) * self.packed_length)
        end_tok = self.shuffled_lengths[end_pos] - (self.ends[end_pos] - (index + 1) * self.packed_length)
        out = {"tokens": [], "cu_seqlens": [0], "indexes": [], "labels": [], "type_ids": []}
        pos, tok = start_pos, start_tok
        while True:
            sample = self.dataset[int(self.order[pos])]
            tokens = list(sample["tokens"])
            last = pos == end_pos
            chunk = tokens[tok:end_tok] if last else tokens[tok:]
            cut_inside = last and end_tok < len(tokens)
            out["tokens"] += chunk
            out["labels"] += chunk[1:] + [tokens[end_tok] if cut_inside else -100]
            out["type_ids"] += [sample.get("type_id", 0)] * len(chunk)
            self._pieces(out, chunk)
            if last:
                return out
            pos, tok = pos + 1, 0

    def _unpack(self, index: int) -> dict:
        out = {"tokens": [], "cu_seqlens": [0], "indexes": [], "labels": [], "type_ids": []}
        for pos in range(index * self.micro_bsz, min((index + 1) * self.micro_bsz, len(self.order))):
            sample = self.dataset[int(self.order[pos])]
            chunk = list(sample["tokens"])[: self.seq_len]
            out["tokens"] += chunk
            out["labels"] += chunk[1:] + [-100]
            out["type_ids"] += [sample.get("type_id", 0)] * len(chunk)
            out["cu_seqlens"].append(out["cu_seqlens"][-1] + len(chunk))
            out["indexes"] += range(len(chunk))
        pad = self.packed_length - out["cu_seqlens"][-1]
        if pad:
            out["tokens"] += [0] * pad
            out["labels"] += [0] * pad
            out["type_ids"] += [0] * pad
            out["indexes"] += range(pad)
            out["cu_seqlens"].append(self.packed_length)
        return out


class PackedIntoOne:
    """``pack_sample_into_one=True``: fixed ``seq_len`` pieces across sample boundaries."""

    def __init__(self, dataset, seq_len: int, packed_length: int):
        if packed_length % seq_len:
            raise ValueError(f"packed_length {packed_length} is not a multiple of seq_len {seq_len}")
        self.dataset, self.seq_len, self.packed_length = dataset, seq_len, packed_length
        lengths = np.asarray(dataset.lengths)
        self.order = np.arange(len(lengths))
        np.random.RandomState(SEED).shuffle(self.order)
        self.cum = np.cumsum(lengths[self.order])
        self.num_tokens = int(lengths.sum())

    def __len__(self) -> int:
        return self.num_tokens // self.packed_length

    def _find(self, offset: int) -> tuple[int, int]:
        idx = int(np.searchsorted(self.cum, offset, side="right"))
        return idx, offset - (int(self.cum[idx - 1]) if idx else 0)

    def __getitem__(self, index: int) -> dict:
        start_idx, start_len = self._find(index * self.packed_length)
        end_idx, end_len = self._find((index + 1) * self.packed_length)
        tokens, labels, types = [], [], []
        for idx in range(start_idx, end_idx + 1):
            if idx == end_idx and end_len == 0 and idx != start_idx:
                break
            sample = self.dataset[int(self.order[idx])]
            piece = list(sample["tokens"])
            lo = start_len if idx == start_idx else 0
            hi = end_len if idx == end_idx else len(piece)
            piece = piece[lo:hi]
            tokens += piece
            labels += piece[1:] + [-100]
            types += [sample.get("type_id", 0)] * len(piece)
        pieces = self.packed_length // self.seq_len
        return {"tokens": tokens, "cu_seqlens": [i * self.seq_len for i in range(pieces + 1)],
                "indexes": list(range(self.seq_len)) * pieces, "labels": labels, "type_ids": types}


class RandomDataset:
    """InternEvo's synthetic data (``train_folder`` unset): ``[n, r] + list(range(n)) * r``, from
    ``RandomState(1999)``; with ``fixed_seqlen`` the repeat count doubles until the sample is long enough.
    Samples are built on access, not held in memory."""

    def __init__(self, num_samples: int, max_len: int, fixed_seqlen: bool):
        rng = np.random.RandomState(1999)
        self.n = rng.randint(1, 30, size=(num_samples,))
        self.r = rng.randint(10, 200, size=(num_samples,))
        self.max_len, self.fixed = max_len, fixed_seqlen
        self.lengths = np.minimum(2 + self.n * self._repeats(), max_len)

    def _repeats(self) -> np.ndarray:
        r = self.r.copy()
        if self.fixed:
            while True:
                short = self.n * r < self.max_len
                if not short.any():
                    break
                r[short] *= 2
        return r

    def _sample(self, index: int) -> list[int]:
        n, r = int(self.n[index]), int(self.r[index])
        if self.fixed:
            while n * r < self.max_len:
                r *= 2
        return ([n, r] + list(range(n)) * r)[: self.max_len]

    def __len__(self) -> int:
        return len(self.n)

    def __getitem__(self, index: int) -> dict:
        return {"tokens": self._sample(index), "type_id": 0}
