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


def test_sampler_state_is_arrays_and_old_list_states_load(tiny, tmp_path):
    sampler, batches = build_train_batches(tiny, 0, 1)
    list(islice(batches, 240))  # into the second epoch: the generator has shuffled twice
    state = sampler.state_dict()
    assert isinstance(state["indices"], torch.Tensor) and isinstance(state["rng_state"][1], torch.Tensor)
    torch.save(state, tmp_path / "sampler.pt")
    expected = list(islice(batches, 30))
    as_lists = {**state, "indices": state["indices"].tolist(),  # how sampler.pt was written before
                "rng_state": [state["rng_state"][0], state["rng_state"][1].tolist(), *state["rng_state"][2:]]}
    torch.save(as_lists, tmp_path / "old.pt")
    for path in ("sampler.pt", "old.pt"):
        _, resumed = build_train_batches(tiny, 0, 1, sampler_state=torch.load(tmp_path / path, weights_only=True))
        assert _same(list(islice(resumed, 30)), expected), path


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
