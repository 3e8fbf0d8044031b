"""Worker processes, resumable sampler state and the file index, against the single-process stream."""

from __future__ import annotations

import dataclasses
from itertools import islice

import numpy as np
import pytest
import torch

from adapter.config import read_config
from adapter.data.loader import ConcatRows, build_train_batches, packed_rows
from adapter.data.tokenized import TokenizedFile, write_tokenized
from tests.conftest import CONFIGS, REPO


@pytest.fixture
def tiny(monkeypatch):
    """The shipped data's config section (925 packed rows: 115 batches an epoch per rank at dp=2)."""
    monkeypatch.chdir(REPO)
    return read_config(CONFIGS / "tiny.py")[0].data


def _same(a: list, b: list) -> bool:
    def equal(x, y):
        if isinstance(x, list):
            return isinstance(y, list) and len(x) == len(y) and all(map(equal, x, y))
        return x.dtype == y.dtype and torch.equal(x, y)

    return len(a) == len(b) and all(ca == cb and da.keys() == db.keys() and all(equal(da[k], db[k]) for k in da)
                                    for (ca, da), (cb, db) in zip(a, b))


def test_workers_give_the_same_batches_and_resume_exactly(tiny, tmp_path):
    """Two workers read ahead across an epoch boundary; the state saved after batch 113 (the workers are
    already in the next epoch) resumes into the very stream a single process produces."""
    _, alone = build_train_batches(tiny, 1, 2)
    expected = list(islice(alone, 120))
    sampler, ahead = build_train_batches(tiny, 1, 2, num_workers=2)
    first = list(islice(ahead, 113))
    torch.save(sampler.state_dict(), tmp_path / "sampler.pt")
    state = torch.load(tmp_path / "sampler.pt", weights_only=True)
    _, resumed = build_train_batches(tiny, 1, 2, sampler_state=state, num_workers=2)
    assert _same(first + list(islice(resumed, 7)), expected)


def test_sampler_state_is_small_and_old_index_array_states_load(tiny, tmp_path):
    """The state names the epoch by its generator state, not its index array, and loads with weights_only;
    states written with the array (a list before, a tensor when resumed from a list) resume the same stream."""
    sampler, batches = build_train_batches(tiny, 0, 1)
    list(islice(batches, 240))  # into the second epoch: the generator has shuffled twice
    old = {**sampler.state_dict(), "indices": sampler.indices.tolist(),  # how sampler.pt was written before
           "rng_state": [part.tolist() if isinstance(part, np.ndarray) else part for part in sampler.rng.get_state()]}
    for key in ("num_samples", "epoch_size", "epoch_rng_state"):
        del old[key]
    torch.save(sampler.state_dict(), tmp_path / "sampler.pt")
    torch.save(old, tmp_path / "old.pt")
    assert (tmp_path / "sampler.pt").stat().st_size < 8 * 1024  # the generator's 624 keys, not 925 indices
    expected = list(islice(batches, 200))  # and on into the third epoch
    for path in ("sampler.pt", "old.pt"):
        _, resumed = build_train_batches(tiny, 0, 1, sampler_state=torch.load(tmp_path / path, weights_only=True))
        assert _same(list(islice(resumed, 200)), expected), path
    again, resumed = build_train_batches(tiny, 0, 1, sampler_state=torch.load(tmp_path / "old.pt", weights_only=True))
    list(islice(resumed, 10))  # still in the epoch the old state described: its array is saved, as a tensor
    assert isinstance(again.state_dict()["indices"], torch.Tensor)
    torch.save(again.state_dict(), tmp_path / "again.pt")
    _, resumed = build_train_batches(tiny, 0, 1, sampler_state=torch.load(tmp_path / "again.pt", weights_only=True))
    assert _same(list(islice(resumed, 190)), expected[10:])
    with pytest.raises(ValueError, match="saved over 925 packed rows; the data now has 1850"):
        build_train_batches(dataclasses.replace(tiny, micro_bsz=1), 0, 1,
                            sampler_state=torch.load(tmp_path / "sampler.pt", weights_only=True))


def test_concat_rows_find_the_part_of_every_row():
    sizes = [3, 0, 1, 5, 0, 0, 2]
    parts = [[(p, i) for i in range(n)] for p, n in enumerate(sizes)]
    rows = ConcatRows(parts)
    assert [rows[i] for i in range(len(rows))] == [row for part in parts for row in part]
    for bad in (-1, len(rows)):
        with pytest.raises(IndexError):
            rows[bad]


@pytest.mark.parametrize("dtype, columns, order", [(np.int32, 2, "C"), (np.int64, 3, "C"), (np.int64, 2, "F")])
def test_metas_as_internevo_writes_them(tmp_path, dtype, columns, order):
    """InternEvo's tokenizer writes int32 metas, and some have a middle column; the last one is the length.
    A meta saved from a column-major array is read as such."""
    g = np.random.RandomState(3)
    write_tokenized(tmp_path / "en" / "a.bin", [list(g.randint(1, 100, size=n)) for n in g.randint(3, 40, size=30)])
    cfg = dataclasses.replace(read_config(CONFIGS / "tiny.py")[0].data, train_folder=str(tmp_path), seq_len=16,
                              micro_num=2)
    expected = [packed_rows(cfg)[i] for i in range(10)]
    meta = np.load(tmp_path / "en" / "a.bin.meta")
    middle = [np.full(len(meta), 7)] if columns == 3 else []
    with open(tmp_path / "en" / "a.bin.meta", "wb") as f:  # np.save would add ".npy" to a path
        np.save(f, np.stack([meta[:, 0], *middle, meta[:, 1]], axis=1).astype(dtype, order=order))
    assert np.load(tmp_path / "en" / "a.bin.meta").dtype == dtype
    rows = packed_rows(cfg)
    assert all(rows[i].keys() == row.keys() and all(np.array_equal(rows[i][k], row[k]) for k in row)
               for i, row in enumerate(expected))
    assert TokenizedFile(tmp_path / "en" / "a.bin").lengths.tolist() == meta[:, 1].tolist()


def test_cumulative_lengths_widen_past_2_to_the_32_tokens():
    from adapter.data.packing import cumulative_lengths

    order = np.array([2, 0, 1], dtype=np.int32)
    small = cumulative_lengths(np.array([5, 7, 2**31 - 1], dtype=np.int32), order)
    big = cumulative_lengths(np.array([2**31 - 1, 2**31 - 1, 3], dtype=np.int32), order)
    assert small.dtype == np.uint32 and small.tolist() == [2**31 - 1, 2**31 + 4, 2**31 + 11]
    assert big.dtype == np.int64 and big.tolist() == [3, 2**31 + 2, 2**32 + 1]
