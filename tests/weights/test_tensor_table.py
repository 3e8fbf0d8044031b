"""The tensor table against files other code wrote: InternEvo's own checkpoints for every family, and the
state dict of transformers' ``LlamaForCausalLM``. Every key matches exactly one row; every row is met. The
fusion and splits are checked against layouts written out here from the sources' documentation."""

from __future__ import annotations

import pytest
import torch

from adapter.config import read_config
from adapter.families import FAMILIES, logical_table, recognise_internevo
from adapter.weights.stored import Stored
from tests.conftest import FIXTURES


def rows(table):
    return table.embedding + table.layer + table.final


def matches(row: Stored, key: str) -> bool:
    """``key`` is ``row``'s name, with a layer number where the name has ``{i}``."""
    head, _, tail = row.name.partition("{i}")
    if "{i}" not in row.name:
        return key == row.name
    middle = key[len(head):len(key) - len(tail)]
    return key.startswith(head) and key.endswith(tail) and middle.isdigit()


@pytest.mark.parametrize("family", ["internlm1", "internlm2", "llama2"])
def test_internevo_files_match_one_row_each(family):
    folder = FIXTURES / f"{family}_tiny"
    model = read_config(folder / "config.py")[0].model
    keys = list(torch.load(folder / "ckpt" / "model_tp0_pp0.pt", weights_only=True, map_location="meta"))
    assert recognise_internevo(keys).name == family
    table = logical_table(model)
    found = [[row for row in rows(table) if matches(row, key)] for key in keys]
    assert all(len(f) == 1 for f in found), keys
    assert {f[0] for f in found} == set(rows(table))
    assert all(table.find(key)[0] == f[0] for key, f in zip(keys, found))
    assert [k for k, _ in table.all_keys(model)] == keys  # InternEvo's own file order
    others = [f for f in FAMILIES.values() if f.name != family]
    assert not any(recognise_internevo([k]) in others for k in keys)


@pytest.mark.parametrize("family", ["internlm1", "internlm2", "llama2"])
def test_transformers_llama_state_dict_matches_one_row_each(family):
    transformers = pytest.importorskip("transformers")
    from adapter.checkpoint.formats.hf import export_table, hf_config

    model = read_config(FIXTURES / f"{family}_tiny" / "config.py")[0].model
    with torch.device("meta"):
        llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(model)))
    keys = [k for k in llama.state_dict() if not k.endswith("rotary_emb.inv_freq")]
    table = export_table(model)
    assert sorted(k for k, _ in table.all_keys(model)) == sorted(keys)
    assert all(sum(matches(row, k) for row in rows(table)) == 1 for k in keys)


def test_grouped_qkv_layout():
    """InternLM2's ``wqkv``/megatron's ``linear_qkv`` with 4 query heads and 2 kv heads (d = 1 row each):
    per kv head j, [q_2j, q_2j+1, k_j, v_j]; rank 1 of 2 holds kv group 1 whole."""
    q, k, v = torch.arange(4.0), torch.arange(10.0, 12.0), torch.arange(20.0, 22.0)
    stored = Stored("wqkv", ("q", "k", "v"), "rows", blocks=2, rows=(4, 2, 2))
    fused = stored.fuse([q, k, v])
    assert fused.tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert stored.shard([q, k, v], 2, 1).tolist() == [2, 3, 11, 21]
    assert [t.tolist() for t in stored.unfuse(fused)] == [q.tolist(), k.tolist(), v.tolist()]
    assert [t.tolist() for t in stored.merge([stored.shard([q, k, v], 2, r) for r in range(2)])] == \
        [q.tolist(), k.tolist(), v.tolist()]


def test_concatenated_qkv_shards_per_rank():
    """InternLM1's ``Wqkv`` is [Q; K; V]; a tensor rank's file holds [Q_t; K_t; V_t] (its own heads)."""
    q, k, v = torch.arange(4.0), torch.arange(10.0, 14.0), torch.arange(20.0, 24.0)
    stored = Stored("Wqkv", ("q", "k", "v"), "rows", rows=(4, 4, 4))
    assert stored.fuse([q, k, v]).tolist() == q.tolist() + k.tolist() + v.tolist()
    pieces = [stored.cut(stored.fuse([q, k, v]), 2, r) for r in range(2)]
    assert pieces[1].tolist() == [2, 3, 12, 13, 22, 23]
    assert torch.equal(stored.join(pieces), stored.fuse([q, k, v]))


def test_splits():
    t = torch.arange(10.0).reshape(5, 2)
    assert Stored("head", ("head",), "uneven_rows").cut(t, 2, 0).shape == (3, 2)  # first ranks larger
    assert Stored("head", ("head",), "uneven_rows").cut(t, 2, 1).shape == (2, 2)
    assert Stored("b", ("o.bias",), "first").cut(t, 2, 1) is None
    assert Stored("w", ("down",), "columns").cut(t, 2, 1).tolist() == [[1], [3], [5], [7], [9]]
    with pytest.raises(ValueError, match="does not split into 2"):
        Stored("w", ("gate",), "rows").cut(t, 2, 0)
