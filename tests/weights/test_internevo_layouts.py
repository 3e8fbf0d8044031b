"""InternEvo's per-tensor-rank files against layouts written out here from InternEvo 0.5.2's split rules
(``core/parallel/shard.py``, ``model/modules/linear.py``, ``embedding.py``; ``INTERNEVO_FORMAT.md`` §3):
column-parallel ``Wqkv``/``wqkv``/``w1``/``w3`` split rows, row-parallel ``out_proj``/``wo``/``w2`` split columns
and keep their bias on tensor rank 0 only, the embedding splits the hidden dim, the head splits the vocabulary
with the first ranks one row larger, norms are whole. The fixtures are tp=1 files, and converting through the
same table both ways round-trips whatever the split, so only these pin the tp layout."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adapter.checkpoint.formats.internevo import shard_state_dict
from tests.weights.test_mcore_layouts import F, H, distinct, layout, model

V = 7  # not divisible by 2: the head's rank 0 gets rows 0-3, rank 1 rows 4-6
HEAD_ROWS = [slice(0, 4), slice(4, 7)]


def logical(family: str) -> dict[str, torch.Tensor]:
    if family == "internlm1":
        sd = {"embedding.weight": distinct(1, V, H)}
        names = ("blocks.{i}.mixer.", "Wqkv", "out_proj", "blocks.{i}.norm1", "blocks.{i}.norm2", "blocks.{i}.mlp.")
        qkv_rows, final = 12, {"norm.weight": distinct(2, H), "head.weight": distinct(3, V, H)}
    else:
        sd = {"tok_embeddings.weight": distinct(1, V, H)}
        names = ("layers.{i}.attention.", "wqkv", "wo", "layers.{i}.attention_norm", "layers.{i}.ffn_norm",
                 "layers.{i}.feed_forward.")
        qkv_rows, final = 8, {"norm.weight": distinct(2, H), "output.weight": distinct(3, V, H)}
    attn, qkv, out, n1, n2, mlp = names
    for i in range(4):
        t = 10 * (i + 1)
        sd |= {attn.format(i=i) + qkv + ".weight": distinct(t, qkv_rows, H),
               attn.format(i=i) + qkv + ".bias": distinct(t + 1, qkv_rows),
               attn.format(i=i) + out + ".weight": distinct(t + 2, H, H), attn.format(i=i) + out + ".bias": distinct(t + 3, H),
               n1.format(i=i) + ".weight": distinct(t + 4, H), n2.format(i=i) + ".weight": distinct(t + 5, H),
               mlp.format(i=i) + "w1.weight": distinct(t + 6, F, H), mlp.format(i=i) + "w2.weight": distinct(t + 7, H, F),
               mlp.format(i=i) + "w3.weight": distinct(t + 8, F, H)}
    return sd | final


def expected(family: str, sd: dict, r: int) -> dict[str, torch.Tensor]:
    """Rank ``r`` of 2: InternLM1's ``Wqkv`` holds [Q_r; K_r; V_r] (heads 2r, 2r+1 of each), InternLM2's
    ``wqkv`` kv group r whole."""
    half = slice(2 * r, 2 * r + 2)
    qkv_rows = ([2 * r, 2 * r + 1, 4 + 2 * r, 5 + 2 * r, 8 + 2 * r, 9 + 2 * r] if family == "internlm1"
                else list(range(4 * r, 4 * r + 4)))
    out = {}
    for key, value in sd.items():
        if key in ("embedding.weight", "tok_embeddings.weight"):
            out[key] = value[:, half]
        elif key in ("head.weight", "output.weight"):
            out[key] = value[HEAD_ROWS[r]]
        elif ".Wqkv." in key or ".wqkv." in key:
            out[key] = value[qkv_rows]
        elif key.endswith(("out_proj.weight", "wo.weight", "w2.weight")):
            out[key] = value[:, half]
        elif key.endswith(("out_proj.bias", "wo.bias")):
            if r == 0:
                out[key] = value
        elif key.endswith(("w1.weight", "w3.weight")):
            out[key] = value[half]
        else:  # norms
            out[key] = value
    return out


@pytest.mark.parametrize("family, kv", [("internlm1", 4), ("internlm2", 2)])
def test_internevo_tensor_rank_files_by_hand(family, kv):
    m = dataclasses.replace(model(family, kv), vocab_size=V)
    sd = logical(family)
    for r in range(2):
        shard = shard_state_dict(sd, m, layout(2, 1, 1), r, 0)
        want = expected(family, sd, r)
        assert sorted(shard) == sorted(want), r
        for key, value in want.items():
            assert torch.equal(shard[key], value), (r, key)
