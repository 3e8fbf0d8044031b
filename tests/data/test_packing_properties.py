"""Packed rows over random sample lengths, boundary hits included, against the token stream itself.

Written from InternEvo 0.5.2's ``internlm/data/packed_dataset.py``: samples are shuffled with
``RandomState(1024)`` and concatenated; row ``i`` is tokens ``[i*P, (i+1)*P)`` of that stream. A token's label
is the next token of its sample, -100 after the sample's last token. ``PackedDatasetWithCut`` keeps the
next token at a row end that cuts a sample and marks every sample fragment in ``cu_seqlens`` (cut into
pieces of at most ``seq_len``); ``PackedDatasetWithoutCuSeqlen`` (``pack_sample_into_one``) labels a row's
last token -100 and uses fixed ``seq_len`` pieces. Only the public outputs are checked.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter.data.packing import PackedIntoOne, PackedWithCut, RandomDataset


class Samples:
    """A dataset whose sample ``i`` is ``[1000*i + 1, 1000*i + 2, …]`` (every token names its sample)."""

    def __init__(self, lengths: list[int]):
        self.lengths = np.asarray(lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict:
        return {"tokens": [1000 * i + k + 1 for k in range(int(self.lengths[i]))], "type_id": i % 3}


def as_lists(row: dict) -> dict:
    """A row's fields as plain lists (rows are numpy arrays)."""
    return {k: np.asarray(v).tolist() for k, v in row.items()}


def shuffled(n: int) -> list[int]:
    order = np.arange(n)
    np.random.RandomState(1024).shuffle(order)
    return [int(i) for i in order]


@st.composite
def layouts(draw):
    """``(dataset, seq_len, micro_bsz)``: samples whose *shuffled* order has the drawn lengths, cut at random
    points of the stream; when ``aligned`` every row boundary is also a sample boundary."""
    seq_len, micro_bsz = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    packed = seq_len * micro_bsz
    total = packed * draw(st.integers(1, 6)) + draw(st.integers(0, packed - 1))
    cuts = draw(st.sets(st.integers(1, total - 1), max_size=total)) if total > 1 else set()
    if draw(st.booleans()):
        cuts |= set(range(packed, total, packed))
    bounds = [0, *sorted(cuts), total]
    in_stream_order = [b - a for a, b in zip(bounds, bounds[1:])]
    lengths = [0] * len(in_stream_order)
    for position, index in enumerate(shuffled(len(lengths))):
        lengths[index] = in_stream_order[position]
    return Samples(lengths), seq_len, micro_bsz


def streams(ds: Samples) -> tuple[list[int], list[int], list[int], list[int]]:
    """Tokens, labels, type ids, and the stream offsets where a sample starts, in shuffled order."""
    tokens, labels, types, starts = [], [], [], []
    for i in shuffled(len(ds)):
        sample = ds[i]["tokens"]
        starts.append(len(tokens))
        tokens += sample
        labels += sample[1:] + [-100]
        types += [i % 3] * len(sample)
    return tokens, labels, types, starts


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_packed_into_one_rows_are_stream_windows(case):
    ds, seq_len, micro_bsz = case
    packed = seq_len * micro_bsz
    rows = PackedIntoOne(ds, seq_len, packed)
    tokens, labels, types, _ = streams(ds)
    assert len(rows) == len(tokens) // packed
    for i in range(len(rows)):
        row, window = as_lists(rows[i]), slice(i * packed, (i + 1) * packed)
        assert row["tokens"] == tokens[window] and row["type_ids"] == types[window]
        assert row["labels"] == labels[window][:-1] + [-100]  # the row's last token predicts nothing
        assert row["cu_seqlens"] == list(range(0, packed + 1, seq_len))
        assert row["indexes"] == list(range(seq_len)) * micro_bsz


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_packed_with_cut_rows_are_stream_windows(case):
    ds, seq_len, micro_bsz = case
    packed = seq_len * micro_bsz
    rows = PackedWithCut(ds, seq_len, packed, micro_bsz)
    tokens, labels, types, starts = streams(ds)
    assert len(rows) == len(tokens) // packed
    for i in range(len(rows)):
        row, lo, hi = as_lists(rows[i]), i * packed, (i + 1) * packed
        assert row["tokens"] == tokens[lo:hi] and row["type_ids"] == types[lo:hi]
        assert row["labels"] == labels[lo:hi]  # a cut sample keeps its next token as the last label
        fragments = sorted({lo, hi} | {s for s in starts if lo < s < hi})
        cu = [0]
        for a, b in zip(fragments, fragments[1:]):
            cu += [min(a + k, b) - lo for k in range(seq_len, b - a + seq_len, seq_len)]
        assert row["cu_seqlens"] == cu
        assert row["indexes"] == [j for a, b in zip(cu, cu[1:]) for j in range(b - a)]


def test_row_starting_on_a_sample_boundary():
    """Two rows of 4 tokens from samples of 4 and 4 tokens: the second row starts exactly on a boundary."""
    ds = Samples([4, 4])
    order = shuffled(2)
    row = as_lists(PackedIntoOne(ds, 2, 4)[1])
    assert row["tokens"] == ds[order[1]]["tokens"] and len(row["labels"]) == 4


def recipe(n: int, r: int, max_len: int, fixed: bool) -> list[int]:
    """InternEvo's ``RandomDataset`` sample: ``[n, r]`` then ``range(n)`` repeated ``r`` times (``r`` doubled
    until ``n * r`` reaches ``max_len`` with ``fixed_seqlen``), cut to ``max_len``."""
    while fixed and n * r < max_len:
        r *= 2
    return ([n, r] + list(range(n)) * r)[:max_len]


def test_random_dataset_lengths_count_the_header():
    """``lengths`` (what packing cuts the stream by) are the samples' own lengths, the 2-token header included,
    with and without ``fixed_random_dataset_seqlen``."""
    rng = np.random.RandomState(1999)
    n, r = rng.randint(1, 30, size=50), rng.randint(10, 200, size=50)
    for fixed in (False, True):
        for max_len in (64, 4096):
            ds = RandomDataset(50, max_len=max_len, fixed_seqlen=fixed)
            samples = [recipe(int(a), int(b), max_len, fixed) for a, b in zip(n, r)]
            assert [np.asarray(ds[i]["tokens"]).tolist() for i in range(50)] == samples
            assert [int(x) for x in ds.lengths] == [len(s) for s in samples]
