"""Data the model cannot train on is refused with one line that names the file, before a step runs."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from adapter.config import read_config
from adapter.data.loader import build_train_batches
from adapter.data.tokenized import DataError, write_tokenized
from adapter.data.validation import build_valid_batches
from tests.conftest import CONFIGS


def _cfg(folder, **changes):
    data = read_config(CONFIGS / "tiny.py")[0].data
    return dataclasses.replace(data, train_folder=str(folder), seq_len=8, micro_bsz=2, micro_num=2, **changes)


@pytest.mark.parametrize("workers", [0, 2])
def test_token_ids_outside_the_vocabulary(tmp_path, workers):
    write_tokenized(tmp_path / "en" / "a.bin", [list(range(1, 40))] * 6)
    _, batches = build_train_batches(_cfg(tmp_path), 0, 1, vocab_size=40, num_workers=workers)
    next(batches)  # every id < 40: accepted
    write_tokenized(tmp_path / "en" / "a.bin", [list(range(1, 40))] * 5 + [[5, -41, 7] * 13])  # abs(id) is the input
    _, batches = build_train_batches(_cfg(tmp_path), 0, 1, vocab_size=40, num_workers=workers)
    with pytest.raises(DataError) as caught:
        for _ in range(3):  # every sample is read within the first epoch's 3 batches
            next(batches)
    message, offset = str(caught.value), np.load(tmp_path / "en" / "a.bin.meta")[5, 0]
    assert message.startswith(f"{tmp_path / 'en' / 'a.bin'}: byte {offset}: token id -41 is outside")
    assert "model.vocab_size=40" in message and "\n" not in message


def test_validation_ids_outside_the_vocabulary(tmp_path):
    write_tokenized(tmp_path / "val" / "a.bin", [list(range(1, 60)), list(range(1, 61))])
    cfg = _cfg(tmp_path, valid_folder=str(tmp_path))
    assert build_valid_batches(cfg, 0, 1, vocab_size=61)
    with pytest.raises(DataError, match=r"val/a.bin: byte \d+: token id 60 is outside"):
        build_valid_batches(cfg, 0, 1, vocab_size=60)


def test_an_empty_data_folder_says_so(tmp_path):
    (tmp_path / "en").mkdir()
    with pytest.raises(DataError, match=f"^{tmp_path}: the training data folder holds no data \\(no .bin files"):
        build_train_batches(_cfg(tmp_path), 0, 1)
    write_tokenized(tmp_path / "en" / "a.bin", [])
    write_tokenized(tmp_path / "en" / "b.bin", [[1, 2, 3]])
    with pytest.raises(DataError, match="holds no data: its 2 .bin files hold no samples of at least "
                                        "data.min_length=4 tokens"):
        build_train_batches(_cfg(tmp_path, min_length=4), 0, 1)
    os.remove(tmp_path / "en" / "b.bin")
    with pytest.raises(DataError, match="its 1 .bin files hold no samples$"):
        build_train_batches(_cfg(tmp_path), 0, 1)


def _save(path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save would add ".npy" to a path
        np.save(f, array)


def test_a_meta_that_does_not_match_its_bin(tmp_path):
    write_tokenized(tmp_path / "en" / "a.bin", [[1, 2, 3, 4]] * 8)
    meta = np.load(tmp_path / "en" / "a.bin.meta")
    meta[:, 1] = 5
    _save(tmp_path / "en" / "a.bin.meta", meta)
    _, batches = build_train_batches(_cfg(tmp_path), 0, 1)
    with pytest.raises(DataError, match=r"a.bin: byte \d+: 4 tokens where a.bin.meta says 5"):
        next(batches)
    _save(tmp_path / "en" / "a.bin.meta", meta[:, 0])
    with pytest.raises(DataError, match=r"a.bin.meta: expected an \[N, 2\] integer array"):
        build_train_batches(_cfg(tmp_path), 0, 1)
