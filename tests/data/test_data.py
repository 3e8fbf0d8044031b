"""InternEvo's data pipeline against batches InternEvo's own dataloader produced."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from adapter.config import read_config
from adapter.data.loader import build_train_batches, packed_rows
from adapter.data.packing import RandomDataset
from adapter.data.tokenized import DataError, TokenizedFile, find_files, write_tokenized
from adapter.train.batches import to_microbatches
from tests.conftest import FIXTURES

# the order InternEvo's machine listed the type folders in (its walk is unsorted; see tokenized.find_files)
FIXTURE_FOLDER_ORDER = ["en", "code"]


def _equal(a, b) -> bool:
    if isinstance(b, list):
        return isinstance(a, list) and len(a) == len(b) and all(torch.equal(x, y) and x.dtype == y.dtype
                                                                 for x, y in zip(a, b))
    return torch.equal(a, b) and a.dtype == b.dtype


@pytest.mark.parametrize("family", ["internlm1", "internlm2"])
@pytest.mark.parametrize("packed, name", [(True, "packed_batch.pt"), (False, "packed_batch_unpacked.pt")])
def test_first_batch_equals_internevo(monkeypatch, family, packed, name):
    fixture = FIXTURES / f"{family}_tiny"
    cfg, _ = read_config(fixture / "config.py")
    monkeypatch.chdir(fixture)  # train_folder="data" is relative to the run's directory, as in InternEvo
    _, batches = build_train_batches(dataclasses.replace(cfg.data, use_packed_dataset=packed), 0, 1,
                                     folder_order=FIXTURE_FOLDER_ORDER)
    count, batch = next(batches)
    expected = torch.load(name, weights_only=True)
    assert count == 0 and batch.keys() == expected.keys()
    for key in expected:
        assert _equal(batch[key], expected[key]), key


def test_unpacked_rows_follow_unpack_data(monkeypatch):
    fixture = FIXTURES / "internlm1_tiny"
    batch = torch.load(fixture / "packed_batch_unpacked.pt", weights_only=True)
    micro = to_microbatches(batch, packed=False, micro_bsz=2, seq_len=16)
    assert len(micro) == 2 and micro[0].input_ids.shape == (2, 16) and micro[0].cu_seqlens is None
    cu = batch["cu_seqlens"][0].tolist()  # [0, 12, 28, 32]: samples of 12 and 16 tokens, then padding
    assert torch.equal(micro[0].input_ids[0, :12], batch["input_ids"][0, :12])
    assert torch.equal(micro[0].input_ids[1], batch["input_ids"][0, cu[1]:cu[2]])
    assert micro[0].input_ids[0, 12:].eq(0).all() and micro[0].labels[0, 12:].eq(0).all()  # as unpack_data
    packed = to_microbatches(torch.load(fixture / "packed_batch.pt", weights_only=True), packed=True, micro_bsz=2,
                             seq_len=16)
    assert packed[1].cu_seqlens.tolist() == [0, 1, 17, 21, 29, 32]


def test_write_read_round_trip_and_min_length(tmp_path):
    samples = [[1, 2, 3], list(range(1, 60)), [7] * 10]
    write_tokenized(tmp_path / "en" / "a.bin", samples)
    ds = TokenizedFile(tmp_path / "en" / "a.bin", type_id=3)
    assert [ds[i]["tokens"].tolist() for i in range(3)] == samples and ds[0]["type_id"] == 3
    assert ds.lengths.tolist() == [3, 59, 10]
    kept = TokenizedFile(tmp_path / "en" / "a.bin", min_length=10)
    assert [kept[i]["tokens"].tolist() for i in (0, 1)] == [samples[1], samples[2]] and kept.lengths.tolist() == [59, 10]
    assert np.load(tmp_path / "en" / "a.bin.meta").dtype == np.int64


def test_folder_layout_errors(tmp_path):
    write_tokenized(tmp_path / "loose.bin", [[1, 2]])
    with pytest.raises(DataError, match="loose.bin: must lie under exactly one data-type folder"):
        find_files(tmp_path)
    with pytest.raises(DataError, match="not found"):
        find_files(tmp_path / "nope")
    os.remove(tmp_path / "loose.bin")
    write_tokenized(tmp_path / "en" / "x.bin", [[1, 2]])
    os.remove(tmp_path / "en" / "x.bin.meta")
    with pytest.raises(DataError, match="x.bin.meta: missing"):
        TokenizedFile(tmp_path / "en" / "x.bin")


def _data_cfg(tmp_path, **changes):
    cfg, _ = read_config(FIXTURES / "internlm1_tiny" / "config.py")
    return dataclasses.replace(cfg.data, train_folder=str(tmp_path), use_packed_dataset=True, **changes)


def test_pack_sample_into_one(tmp_path):
    write_tokenized(tmp_path / "en" / "a.bin", [list(range(1, 20)), list(range(1, 40)), list(range(1, 30))])
    rows = packed_rows(_data_cfg(tmp_path, pack_sample_into_one=True))
    assert len(rows) == (19 + 39 + 29) // 32
    row = rows[0]
    assert row["cu_seqlens"].tolist() == [0, 16, 32] and row["indexes"].tolist() == list(range(16)) * 2
    assert len(row["tokens"]) == 32


def test_packing_invariants(tmp_path):
    g = np.random.RandomState(0)
    write_tokenized(tmp_path / "en" / "a.bin", [list(g.randint(1, 100, size=n)) for n in g.randint(3, 40, size=30)])
    rows = packed_rows(_data_cfg(tmp_path))
    stream = []
    for i in range(len(rows)):
        row = rows[i]
        cu = row["cu_seqlens"].tolist()
        assert len(row["tokens"]) == len(row["labels"]) == len(row["indexes"]) == 32 and cu[0] == 0 and cu[-1] == 32
        assert all(0 < b - a <= 16 for a, b in zip(cu, cu[1:]))  # pieces of at most seq_len
        assert row["indexes"].tolist() == [j for a, b in zip(cu, cu[1:]) for j in range(b - a)]
        stream += row["tokens"].tolist()
    assert len(stream) == len(rows) * 32  # consecutive windows of the shuffled token stream


def test_sampler_dp_split_rampup_and_resume(tmp_path):
    g = np.random.RandomState(1)
    write_tokenized(tmp_path / "en" / "a.bin", [list(g.randint(1, 100, size=30)) for _ in range(80)])
    cfg = _data_cfg(tmp_path, micro_num=4)
    seen = []
    for rank in (0, 1):
        _, it = build_train_batches(cfg, rank, 2)
        seen.append([b["input_ids"] for _, b in (next(it) for _ in range(3))])
    flat = [tuple(row.tolist()) for batches in seen for b in batches for row in b]
    assert len(flat) == len(set(flat))  # ranks see disjoint rows
    ramp = dataclasses.replace(cfg, rampup_batch_size=(2, 1, 2))
    _, it = build_train_batches(ramp, 0, 1)
    assert [next(it)[1]["input_ids"].shape[0] for _ in range(6)] == [2, 2, 3, 3, 4, 4]
    # resume: a sampler restored from its state continues with the same batches
    sampler, it = build_train_batches(cfg, 0, 1)
    for _ in range(5):
        next(it)
    path = tmp_path / "sampler.pt"
    torch.save(sampler.state_dict(), path)
    expected = [next(it)[1]["input_ids"] for _ in range(4)]
    _, resumed = build_train_batches(cfg, 0, 1, sampler_state=torch.load(path, weights_only=True))
    got = [next(resumed)[1]["input_ids"] for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_synthetic_dataset_recipe():
    ds = RandomDataset(10, max_len=64, fixed_seqlen=True)
    rng = np.random.RandomState(1999)
    n, r = rng.randint(1, 30, size=10), rng.randint(10, 200, size=10)
    first = ds[0]["tokens"].tolist()
    rep = r[0]
    while n[0] * rep < 64:
        rep *= 2
    assert first == ([n[0], rep] + list(range(n[0])) * rep)[:64]
    assert ds.lengths.tolist() == [len(ds[i]["tokens"]) for i in range(10)]


def test_prepare_jsonl_with_byte_tokenizer(tmp_path):
    import gzip
    import json

    from adapter.data.prepare import main

    raw = tmp_path / "raw.jsonl.gz"
    with gzip.open(raw, "wt") as f:
        for text in ("hello", "", "héllo wörld"):
            f.write(json.dumps({"text": text}) + "\n")
    out = tmp_path / "data" / "en" / "train_000.bin"
    assert main(["--tokenizer", "bytes", "--input", str(raw), "--output", str(out), "--eos", "2"]) == 0
    ds = TokenizedFile(out)
    assert [ds[i]["tokens"].tolist() for i in range(3)] == [[b + 1 for b in b"hello"] + [2], [2],
                                                   [b + 1 for b in "héllo wörld".encode()] + [2]]
    assert [(path.name, type_id) for path, type_id in find_files(tmp_path / "data")] == [("train_000.bin", 0)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:2: expected a JSON object with a 'text' string"):
        main(["--tokenizer", "bytes", "--input", str(bad), "--output", str(tmp_path / "x.bin")])
    assert not (tmp_path / "x.bin").exists()  # nothing half-written
