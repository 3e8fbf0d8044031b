"""The logical state dict ⇄ megatron-core chunks against layouts written out here by hand, without the
multi-process model runs (which catch a swapped norm or a wrongly split ``linear_proj`` only through the
logits, slowly).

Megatron-LM's local GPT layer spec (``get_gpt_layer_local_spec``): ``input_layernorm`` before attention,
``pre_mlp_layernorm`` before the MLP; ``linear_qkv`` and ``linear_fc1`` are column-parallel (rows split),
``linear_proj`` and ``linear_fc2`` row-parallel (columns split), their biases whole on every rank;
``linear_qkv`` rows are grouped per kv head ([its q heads; k; v]); ``linear_fc1`` is ``[gate_r; up_r]`` on
rank r; the vocabulary-parallel embedding and output layer split rows. Layers are numbered from 0 in each
chunk. The Transformer Engine spec folds each pre-norm into the next linear layer
(``linear_qkv.layer_norm_weight`` is the input norm, ``linear_fc1.layer_norm_weight`` the pre-MLP norm).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adapter.config import read_config
from adapter.model.mapping import chunk_state_dict, local_spec_name, logical_from_chunk, mcore_unit
from adapter.runtime.layout import ParallelLayout, partition_uniform
from tests.conftest import FIXTURES

V, H, F = 6, 4, 4  # vocabulary, hidden and ffn sizes; 4 heads of one row each


def model(family: str, kv: int):
    base = read_config(FIXTURES / f"{family}_tiny" / "config.py")[0].model
    return dataclasses.replace(base, num_layers=4, hidden_size=H, num_attention_heads=4, num_kv_attention_heads=kv,
                               ffn_hidden_size=F, vocab_size=V, no_bias=False)


def layout(tp: int, pp: int, vpp: int) -> ParallelLayout:
    stages = tuple(tuple(s) for s in partition_uniform(4, pp, vpp))
    return ParallelLayout(tp=tp, pp=pp, vpp=vpp, dp=1, zero1=None, sequence_parallel=False, stages=stages)


def distinct(tag: int, *shape: int) -> torch.Tensor:
    """A tensor whose every element differs from every other tensor's (``tag`` keeps them apart)."""
    n = 1
    for s in shape:
        n *= s
    return (torch.arange(n, dtype=torch.float32) + 1000 * tag).reshape(shape)


def internlm2_logical() -> dict[str, torch.Tensor]:
    """InternEvo's InternLM2 names; ``wqkv`` with 2 kv heads: rows [q0, q1, k0, v0, q2, q3, k1, v1]."""
    sd = {"tok_embeddings.weight": distinct(1, V, H)}
    for i in range(4):
        t = 10 * (i + 1)
        sd |= {f"layers.{i}.attention.wqkv.weight": distinct(t, 8, H), f"layers.{i}.attention.wqkv.bias": distinct(t + 1, 8),
               f"layers.{i}.attention.wo.weight": distinct(t + 2, H, H), f"layers.{i}.attention.wo.bias": distinct(t + 3, H),
               f"layers.{i}.attention_norm.weight": distinct(t + 4, H), f"layers.{i}.ffn_norm.weight": distinct(t + 5, H),
               f"layers.{i}.feed_forward.w1.weight": distinct(t + 6, F, H),
               f"layers.{i}.feed_forward.w2.weight": distinct(t + 7, H, F),
               f"layers.{i}.feed_forward.w3.weight": distinct(t + 8, F, H)}
    return sd | {"norm.weight": distinct(2, H), "output.weight": distinct(3, V, H)}


def expected_internlm2(sd: dict, lay: ParallelLayout, pp: int, vp: int, r: int) -> dict[str, torch.Tensor]:
    """Tensor rank ``r`` of 2, written out: kv group r of ``wqkv`` (rows 4r..4r+3), half the columns of ``wo``
    and ``w2``, ``[w1 rows; w3 rows]`` of its half."""
    half = slice(2 * r, 2 * r + 2)
    out = {}
    if (pp, vp) == (0, 0):
        out["embedding.word_embeddings.weight"] = sd["tok_embeddings.weight"][3 * r:3 * r + 3]
    start, end = lay.stages[pp][vp]
    for local, i in enumerate(range(start, end)):
        m, g = f"decoder.layers.{local}.", f"layers.{i}."
        out |= {m + "self_attention.linear_qkv.weight": sd[g + "attention.wqkv.weight"][4 * r:4 * r + 4],
                m + "self_attention.linear_qkv.bias": sd[g + "attention.wqkv.bias"][4 * r:4 * r + 4],
                m + "self_attention.linear_proj.weight": sd[g + "attention.wo.weight"][:, half],
                m + "self_attention.linear_proj.bias": sd[g + "attention.wo.bias"],
                m + "input_layernorm.weight": sd[g + "attention_norm.weight"],
                m + "pre_mlp_layernorm.weight": sd[g + "ffn_norm.weight"],
                m + "mlp.linear_fc1.weight": torch.cat([sd[g + "feed_forward.w1.weight"][half],
                                                        sd[g + "feed_forward.w3.weight"][half]]),
                m + "mlp.linear_fc2.weight": sd[g + "feed_forward.w2.weight"][:, half]}
    if (pp, vp) == (lay.pp - 1, lay.vpp - 1):
        out["decoder.final_layernorm.weight"] = sd["norm.weight"]
        out["output_layer.weight"] = sd["output.weight"][3 * r:3 * r + 3]
    return out


@pytest.mark.parametrize("pp, vpp", [(1, 1), (2, 1), (2, 2)])
def test_internlm2_chunks_by_hand(pp, vpp):
    m, lay, sd = model("internlm2", 2), layout(2, pp, vpp), internlm2_logical()
    for p in range(pp):
        for vp in range(vpp):
            shards = [chunk_state_dict(sd, m, lay, p, vp, r) for r in range(2)]
            for r, shard in enumerate(shards):
                expected = expected_internlm2(sd, lay, p, vp, r)
                assert sorted(shard) == sorted(expected), (p, vp)
                for key, value in expected.items():
                    assert torch.equal(shard[key], value), (p, vp, r, key)
            back = logical_from_chunk(shards, m, lay, p, vp)
            start, end = lay.stages[p][vp]
            held = [k for k in sd if not k.startswith("layers.") or start <= int(k.split(".")[1]) < end]
            held = [k for k in held if (k != "tok_embeddings.weight" or (p, vp) == (0, 0)) and
                    (k not in ("norm.weight", "output.weight") or (p, vp) == (pp - 1, vpp - 1))]
            assert sorted(back) == sorted(held)
            assert all(torch.equal(back[k], sd[k]) for k in held)


def test_internlm1_qkv_is_regrouped_per_head():
    """InternLM1's ``Wqkv`` is [Q; K; V] (rows q0..q3, k0..k3, v0..v3); megatron-core groups it per head:
    rank r of 2 holds heads 2r and 2r+1 as [q, k, v] each."""
    m = model("internlm1", 4)
    sd = {"embedding.weight": distinct(1, V, H), "norm.weight": distinct(2, H), "head.weight": distinct(3, V, H)}
    for i in range(4):
        t = 10 * (i + 1)
        sd |= {f"blocks.{i}.mixer.Wqkv.weight": distinct(t, 12, H), f"blocks.{i}.mixer.Wqkv.bias": distinct(t + 1, 12),
               f"blocks.{i}.mixer.out_proj.weight": distinct(t + 2, H, H), f"blocks.{i}.mixer.out_proj.bias": distinct(t + 3, H),
               f"blocks.{i}.norm1.weight": distinct(t + 4, H), f"blocks.{i}.norm2.weight": distinct(t + 5, H),
               f"blocks.{i}.mlp.w1.weight": distinct(t + 6, F, H), f"blocks.{i}.mlp.w2.weight": distinct(t + 7, H, F),
               f"blocks.{i}.mlp.w3.weight": distinct(t + 8, F, H)}
    lay = layout(2, 1, 1)
    shards = [chunk_state_dict(sd, m, lay, 0, 0, r) for r in range(2)]
    for r in range(2):
        rows = [x for h in (2 * r, 2 * r + 1) for x in (h, 4 + h, 8 + h)]
        for i in range(4):
            mc, g = f"decoder.layers.{i}.", f"blocks.{i}."
            assert torch.equal(shards[r][mc + "self_attention.linear_qkv.weight"], sd[g + "mixer.Wqkv.weight"][rows])
            assert torch.equal(shards[r][mc + "self_attention.linear_qkv.bias"], sd[g + "mixer.Wqkv.bias"][rows])
            assert torch.equal(shards[r][mc + "self_attention.linear_proj.bias"], sd[g + "mixer.out_proj.bias"])
            assert torch.equal(shards[r][mc + "input_layernorm.weight"], sd[g + "norm1.weight"])
            assert torch.equal(shards[r][mc + "pre_mlp_layernorm.weight"], sd[g + "norm2.weight"])
    back = logical_from_chunk(shards, m, lay, 0, 0)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("key, local", [
    ("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.3.input_layernorm.weight"),
    ("decoder.layers.0.self_attention.linear_qkv.layer_norm_bias", "decoder.layers.0.input_layernorm.bias"),
    ("decoder.layers.12.mlp.linear_fc1.layer_norm_weight", "decoder.layers.12.pre_mlp_layernorm.weight"),
    ("decoder.layers.1.mlp.linear_fc1.layer_norm_bias", "decoder.layers.1.pre_mlp_layernorm.bias"),
    ("decoder.layers.mlp.linear_fc1.layer_norm_weight", "decoder.layers.pre_mlp_layernorm.weight"),  # sharded
    ("decoder.layers.2.self_attention.linear_qkv.weight", "decoder.layers.2.self_attention.linear_qkv.weight"),
    ("decoder.final_layernorm.weight", "decoder.final_layernorm.weight"),
    ("decoder.layers.2.self_attention.linear_proj._extra_state", None),
    ("decoder.layers.self_attention.core_attention._extra_state/shard_0_2", None),
])
def test_transformer_engine_names(key, local):
    assert local_spec_name(key) == local


def test_units_of_megatron_keys_past_ten_layers():
    """Units are 0 for the embedding, 1 + layer, and L + 1 for the final norm and head (``weights.atoms``);
    a 7B has 32 layers, so two-digit layer numbers must be read too."""
    m = dataclasses.replace(model("internlm2", 2), num_layers=12)
    assert mcore_unit(m, "embedding.word_embeddings.weight", 0) == 0
    assert mcore_unit(m, "decoder.layers.3.mlp.linear_fc2.weight", 0) == 4
    assert mcore_unit(m, "decoder.layers.11.self_attention.linear_qkv.weight", 0) == 12
    assert mcore_unit(m, "decoder.layers.10.input_layernorm.weight", 1) == 12  # a chunk starting at layer 1
    assert mcore_unit(m, "decoder.final_layernorm.weight", 0) == mcore_unit(m, "output_layer.weight", 0) == 13
