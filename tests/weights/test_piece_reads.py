"""Reading and writing one tensor rank's pieces without the whole tensors (``Unit._sliced``), against the
whole-tensor path (join every piece, then cut), which the InternEvo fixtures and transformers' Llama pin.

* Loading: a rank's megatron-core chunk from an InternEvo folder read piece by piece (``LazyTensors.sliced_unit``)
  equals the chunk cut from the logical tensors, for sources and targets at different tensor, pipeline and
  virtual sizes, an uneven head (vocabulary 7 over 2 ranks) included.
* Saving: a rank's InternEvo file cut from its own megatron-core pieces equals the file cut from the logical
  tensors, and the only tensor it asks the other ranks for is the embedding: InternEvo splits it on the
  hidden size (``embedding.py``, ``INTERNEVO_FORMAT.md`` §3), megatron-core on the vocabulary; every linear
  layer splits the same rows or columns of each atom on the same rank in both.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adapter.checkpoint.formats.internevo import read_internevo, shard_state_dict, unit_pieces
from adapter.model.mapping import chunk_pieces, chunk_state_dict, chunk_units, mcore_table
from adapter.weights.table import Unit
from tests.checkpoint.test_bridge import tiny_model, write_internevo
from tests.model.workers import random_logical
from tests.weights.test_mcore_layouts import layout

SOURCES = [(1, 1, 1), (2, 1, 1), (2, 2, 2), (1, 2, 1)]
TARGETS = [(1, 1, 1), (2, 1, 1), (2, 2, 1), (1, 2, 2), (2, 2, 2)]


def small(family: str, vocab: int):
    return dataclasses.replace(tiny_model(family), num_layers=4, vocab_size=vocab)


@pytest.mark.parametrize("family,vocab", [("internlm1", 64), ("internlm2", 64), ("internlm2", 63)])
def test_rank_reads_equal_whole_reads(tmp_path, family, vocab):
    model = small(family, vocab)
    logical = random_logical(model, 1)
    for i, (tp, pp, chunks) in enumerate(SOURCES):
        lazy = read_internevo(write_internevo(tmp_path / str(i), logical, model, tp, pp, chunks), model).lazy()
        for tp_t, pp_t, vpp_t in TARGETS:
            if vocab % tp_t:
                continue  # megatron-core splits the vocabulary evenly
            target = layout(tp_t, pp_t, vpp_t)
            for p in range(pp_t):
                for vp in range(vpp_t):
                    for r in range(tp_t):
                        want = chunk_state_dict(logical, model, target, p, vp, r)
                        got = chunk_state_dict(lazy, model, target, p, vp, r)
                        # and joined into memory of the caller's (a resume's ZeRO partitions): fused tensors
                        # are put row run by row run, every other piece joined there or returned as it is
                        into = {key: torch.full_like(t, float("nan")) for key, t in want.items()}
                        joined = dict(chunk_pieces(lazy, model, target, p, vp, r, into=into.get))
                        assert got.keys() == want.keys() == joined.keys()
                        for key in want:
                            assert torch.equal(got[key], want[key]), (tp, pp, chunks, tp_t, p, vp, r, key)
                            assert torch.equal(joined[key], want[key]), (tp, pp, chunks, tp_t, p, vp, r, key)


@pytest.mark.parametrize("family", ["internlm1", "internlm2", "llama2"])
def test_rank_files_from_own_pieces(family):
    model = small(family, 64)
    logical = random_logical(model, 2)
    lay = layout(2, 2, 2)
    for p in range(2):
        shards = [{vp: chunk_state_dict(logical, model, lay, p, vp, r) for vp in range(2)} for r in range(2)]
        for r in range(2):
            asked: list[str] = []
            got = {}
            for vp in range(2):
                def everyone(stored, key, vp=vp):
                    asked.append(key)
                    return [shards[j][vp][key] for j in range(2)]

                def own(stored, key, rank, vp=vp, r=r):
                    assert rank == r, "a rank's own piece only"
                    return shards[r][vp][key]

                prefix = f"{vp}.model."  # InternEvo's key prefix of virtual chunk vp
                for unit, local in chunk_units(model, lay, p, vp):
                    source = Unit(model, unit, mcore_table(model), 2, everyone, local, rank_piece=own, local_rank=r)
                    got.update(unit_pieces(source, model, lay, local, prefix, r))
            want = shard_state_dict(logical, model, lay, r, p)
            assert list(got) == list(want)
            for key in want:
                assert torch.equal(got[key], want[key]), (p, r, key)
            assert asked == (["embedding.word_embeddings.weight"] if p == 0 else []), asked
