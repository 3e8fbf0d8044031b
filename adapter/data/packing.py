"""Packing samples into InternEvo's training rows of ``packed_length = micro_bsz * seq_len`` tokens.

Per source file, samples are shuffled with ``RandomState(1024)`` and their token stream is cut into
consecutive ``packed_length`` windows (``PackedWithCut``). Inside a window every sample fragment is split
into pieces of at most ``seq_len`` tokens: ``cu_seqlens`` marks every piece, ``indexes`` (positions) restart
per piece, and labels are the next token within the sample (-100 after its last token; at a window end
that cuts a sample, the label is the sample's next token). ``pack_sample_into_one`` uses fixed ``seq_len``
pieces that ignore sample boundaries (``PackedIntoOne``). With ``use_packed_dataset=False`` a row holds
``micro_bsz`` whole samples (truncated to ``seq_len``) padded with zeros (``PackedWithCut.unpacked``).

The index of a file is two numpy arrays built without a per-sample Python step: the shuffled order (int32
while a file has fewer than 2**31 samples) and the cumulative token counts in that order (uint32 while it
has fewer than 2**32 tokens, else int64), 8 bytes a sample; rows are located by binary search and assembled
as numpy arrays.
"""

from __future__ import annotations

import numpy as np

SEED = 1024  # InternEvo's DEFAULT_SEED for the per-file shuffle


def shuffled_order(count: int) -> np.ndarray:
    """``RandomState(1024).shuffle(arange(count))``, as InternEvo shuffles each file; the permutation depends
    only on ``count``, not on the dtype, so int32 halves the memory of files below 2**31 samples."""
    order = np.arange(count, dtype=np.int32 if count < 2**31 else np.int64)
    np.random.RandomState(SEED).shuffle(order)
    return order


def cumulative_lengths(lengths: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Token count up to and including each sample, in ``order``: uint32 while the file has fewer than 2**32
    tokens (a file of a million samples has about 1e9), else int64. Summed in int64 in place (``cumsum`` with
    a ``dtype`` casts through a buffer, ten times slower)."""
    ends = lengths[order].astype(np.int64)
    np.cumsum(ends, out=ends)
    return ends.astype(np.uint32) if len(ends) and ends[-1] < 2**32 else ends


def _row(tokens: list[np.ndarray], labels: list[np.ndarray], type_ids: list[np.ndarray],
         pieces: list[int]) -> dict:
    """A packed row from its fragments and piece lengths: ``cu_seqlens`` over the pieces, positions per piece."""
    return {"tokens": np.concatenate(tokens), "labels": np.concatenate(labels),
            "type_ids": np.concatenate(type_ids),
            "cu_seqlens": np.concatenate([[0], np.cumsum(pieces, dtype=np.int64)]).astype(np.int32),
            "indexes": np.concatenate([np.arange(n, dtype=np.int64) for n in pieces])}


class PackedWithCut:
    def __init__(self, dataset, seq_len: int, packed_length: int, micro_bsz: int, packed: bool = True):
        self.dataset, self.seq_len, self.packed_length = dataset, seq_len, packed_length
        self.micro_bsz, self.packed = micro_bsz, packed
        lengths = dataset.lengths
        self.order = shuffled_order(len(lengths))
        self.ends = cumulative_lengths(lengths, self.order)
        self.num_tokens = int(self.ends[-1]) if len(self.ends) else 0

    def __len__(self) -> int:
        return self.num_tokens // self.packed_length

    def __getitem__(self, index: int) -> dict:
        return self._pack(index) if self.packed else self._unpack(index)

    def _locate(self, window_end: int) -> int:
        """Position (in shuffled order) of the sample holding token ``window_end - 1``."""
        return int(np.searchsorted(self.ends, window_end, side="left"))

    def _length(self, pos: int) -> int:
        return int(self.ends[pos]) - (int(self.ends[pos - 1]) if pos else 0)

    def _split(self, n: int) -> list[int]:
        full, left = divmod(n, self.seq_len)
        return [self.seq_len] * full + ([left] if left else [])

    def _pack(self, index: int) -> dict:
        start_pos, start_tok = 0, 0
        if index > 0:
            start_pos = self._locate(index * self.packed_length)
            start_tok = self._length(start_pos) - (int(self.ends[start_pos]) - index * self.packed_length)
            if start_tok == self._length(start_pos):
                start_pos, start_tok = start_pos + 1, 0
        end_pos = self._locate((index + 1) * self.packed_length)
        end_tok = self._length(end_pos) - (int(self.ends[end_pos]) - (index + 1) * self.packed_length)
        tokens, labels, type_ids, pieces = [], [], [], []
        for pos in range(start_pos, end_pos + 1):
            sample = self.dataset[int(self.order[pos])]
            whole = sample["tokens"]
            last = pos == end_pos
            tok = start_tok if pos == start_pos else 0
            chunk = whole[tok:end_tok] if last else whole[tok:]
            cut_inside = last and end_tok < len(whole)
            tokens.append(chunk)
            labels.append(np.append(chunk[1:], whole[end_tok] if cut_inside else -100))
            type_ids.append(np.full(len(chunk), sample.get("type_id", 0), dtype=np.int64))
            pieces += self._split(len(chunk))
        return _row(tokens, labels, type_ids, pieces)

    def _unpack(self, index: int) -> dict:
        tokens, labels, type_ids, pieces = [], [], [], []
        for pos in range(index * self.micro_bsz, min((index + 1) * self.micro_bsz, len(self.order))):
            sample = self.dataset[int(self.order[pos])]
            chunk = sample["tokens"][: self.seq_len]
            tokens.append(chunk)
            labels.append(np.append(chunk[1:], -100))
            type_ids.append(np.full(len(chunk), sample.get("type_id", 0), dtype=np.int64))
            pieces.append(len(chunk))
        pad = self.packed_length - sum(pieces)
        if pad:
            zeros = np.zeros(pad, dtype=np.int64)
            tokens.append(zeros)
            labels.append(zeros)
            type_ids.append(zeros)
            pieces.append(pad)
        return _row(tokens, labels, type_ids, pieces)


class PackedIntoOne:
    """``pack_sample_into_one=True``: fixed ``seq_len`` pieces across sample boundaries."""

    def __init__(self, dataset, seq_len: int, packed_length: int):
        if packed_length % seq_len:
            raise ValueError(f"packed_length {packed_length} is not a multiple of seq_len {seq_len}")
        self.dataset, self.seq_len, self.packed_length = dataset, seq_len, packed_length
        lengths = dataset.lengths
        self.order = shuffled_order(len(lengths))
        self.cum = cumulative_lengths(lengths, self.order)
        self.num_tokens = int(self.cum[-1]) if len(self.cum) else 0

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
            lo = start_len if idx == start_idx else 0
            hi = end_len if idx == end_idx else len(sample["tokens"])
            piece = sample["tokens"][lo:hi]
            tokens.append(piece)
            labels.append(np.append(piece[1:], -100))
            types.append(np.full(len(piece), sample.get("type_id", 0), dtype=np.int64))
        return _row(tokens, labels, types, [self.seq_len] * (self.packed_length // self.seq_len))


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

    def _sample(self, index: int) -> np.ndarray:
        n, r = int(self.n[index]), int(self.r[index])
        if self.fixed:
            while n * r < self.max_len:
                r *= 2
        return np.array(([n, r] + list(range(n)) * r)[: self.max_len], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.n)

    def __getitem__(self, index: int) -> dict:
        return {"tokens": self._sample(index), "type_id": 0}
