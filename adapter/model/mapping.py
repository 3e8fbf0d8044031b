"""InternEvo's logical state dict ⇄ the megatron-core chunks, at any TP/PP/VPP.

"Logical" means InternEvo's tp=1, pp=1 state dict: its key names, global layer numbers and its own fused
qkv layouts. The table below names every tensor in both worlds; the functions only slice, concatenate
and reorder rows, so conversions are bit-exact in both directions.

qkv layouts (rows of the fused ``[(heads + 2·kv_heads)·d, H]`` weight, and of its bias):

* megatron-core groups rows by kv head: for group ``j``, ``[q_{j·g} … q_{j·g+g-1}, k_j, v_j]`` (``g`` query
  heads per kv head, ``d`` rows each); tensor rank ``r`` holds groups ``[r·G/tp, (r+1)·G/tp)``.
* InternLM2's ``wqkv`` is already grouped that way (``"(h gs d)"`` with ``gs = g + 2``).
* InternLM1's ``Wqkv`` is ``[Q; K; V]`` (HF's ``cat([q, k, v])``): with ``g = 1`` it is regrouped per head.

The MLP's ``linear_fc1`` on rank ``r`` is ``[w1_r; w3_r]`` (gate, then up: megatron's SwiGLU computes
``silu(first half) * second half``); ``linear_fc2`` is ``w2`` split on columns. The vocabulary-parallel
embedding and output layer are split on rows (InternEvo splits its embedding on hidden instead; that is
an on-disk matter for the checkpoint bridge, the logical tensor is the same).
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import torch

from adapter.config.schema import ModelConfig
from adapter.runtime.layout import ParallelLayout

#: Logical (InternEvo) key templates per family. ``{i}`` is the global layer index.
LOGICAL_NAMES = {
    "internlm1": {
        "embedding": "embedding.weight",
        "qkv.weight": "blocks.{i}.mixer.Wqkv.weight",
        "qkv.bias": "blocks.{i}.mixer.Wqkv.bias",
        "proj.weight": "blocks.{i}.mixer.out_proj.weight",
        "proj.bias": "blocks.{i}.mixer.out_proj.bias",
        "norm1.weight": "blocks.{i}.norm1.weight",
        "norm1.bias": "blocks.{i}.norm1.bias",
        "norm2.weight": "blocks.{i}.norm2.weight",
        "norm2.bias": "blocks.{i}.norm2.bias",
        "w1": "blocks.{i}.mlp.w1.weight",
        "w2": "blocks.{i}.mlp.w2.weight",
        "w3": "blocks.{i}.mlp.w3.weight",
        "final_norm.weight": "norm.weight",
        "final_norm.bias": "norm.bias",
        "head": "head.weight",
    },
    "internlm2": {
        "embedding": "tok_embeddings.weight",
        "qkv.weight": "layers.{i}.attention.wqkv.weight",
        "qkv.bias": "layers.{i}.attention.wqkv.bias",
        "proj.weight": "layers.{i}.attention.wo.weight",
        "proj.bias": "layers.{i}.attention.wo.bias",
        "norm1.weight": "layers.{i}.attention_norm.weight",
        "norm1.bias": "layers.{i}.attention_norm.bias",
        "norm2.weight": "layers.{i}.ffn_norm.weight",
        "norm2.bias": "layers.{i}.ffn_norm.bias",
        "w1": "layers.{i}.feed_forward.w1.weight",
        "w2": "layers.{i}.feed_forward.w2.weight",
        "w3": "layers.{i}.feed_forward.w3.weight",
        "final_norm.weight": "norm.weight",
        "final_norm.bias": "norm.bias",
        "head": "output.weight",
    },
}

#: megatron-core key templates inside one chunk. ``{i}`` is the chunk-local layer index.
MCORE_NAMES = {
    "embedding": "embedding.word_embeddings.weight",
    "qkv.weight": "decoder.layers.{i}.self_attention.linear_qkv.weight",
    "qkv.bias": "decoder.layers.{i}.self_attention.linear_qkv.bias",
    "proj.weight": "decoder.layers.{i}.self_attention.linear_proj.weight",
    "proj.bias": "decoder.layers.{i}.self_attention.linear_proj.bias",
    "norm1.weight": "decoder.layers.{i}.input_layernorm.weight",
    "norm1.bias": "decoder.layers.{i}.input_layernorm.bias",
    "norm2.weight": "decoder.layers.{i}.pre_mlp_layernorm.weight",
    "norm2.bias": "decoder.layers.{i}.pre_mlp_layernorm.bias",
    "fc1": "decoder.layers.{i}.mlp.linear_fc1.weight",
    "w2": "decoder.layers.{i}.mlp.linear_fc2.weight",
    "final_norm.weight": "decoder.final_layernorm.weight",
    "final_norm.bias": "decoder.final_layernorm.bias",
    "head": "output_layer.weight",
}


_CHUNK_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")

#: Transformer Engine's fused names (megatron-core's TE layer spec, Megatron-LM's default on GPUs) → the
#: local spec's: TE folds each pre-norm into the linear layer after it.
TE_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def local_spec_name(key: str) -> Optional[str]:
    """A megatron-core key (per-chunk or sharded) as the local spec names it; None for ``_extra_state``."""
    if key.endswith("_extra_state") or "._extra_state/" in key:
        return None
    for te, local in TE_NAMES.items():
        if key.endswith("." + te):
            return key[: -len(te)] + local
    return key


def mcore_unit(name: str, first_layer: int, num_layers: int) -> int:
    """The model unit (``model_units`` index) of a chunk's megatron-core key, the chunk's layers starting at
    global layer ``first_layer``: 0 for the embedding, ``1 + layer``, or ``num_layers + 1`` for the head."""
    m = _CHUNK_LAYER.match(name)
    if m:
        return 1 + first_layer + int(m[1])
    return 0 if name == MCORE_NAMES["embedding"] else num_layers + 1


def _layer_parts(model: ModelConfig) -> list[str]:
    parts = ["qkv.weight", "proj.weight", "norm1.weight", "norm2.weight"]
    if model.qkv_bias:
        parts.append("qkv.bias")
    if model.out_proj_bias:
        parts.append("proj.bias")
    if model.norm_type == "layernorm":
        parts += ["norm1.bias", "norm2.bias"]
    return parts


def logical_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the logical state dict with its shape, in InternEvo's module order."""
    h, f, vocab = model.hidden_size, model.ffn_hidden_size, model.vocab_size
    rows = (model.num_attention_heads + 2 * model.num_kv_attention_heads) * model.head_dim
    shapes = {"embedding": (vocab, h), "head": (vocab, h), "qkv.weight": (rows, h), "qkv.bias": (rows,),
              "proj.weight": (h, h), "w1": (f, h), "w3": (f, h), "w2": (h, f)}
    names = LOGICAL_NAMES[model.family]
    out = {names["embedding"]: shapes["embedding"]}
    for i in range(model.num_layers):
        for part in _layer_parts(model) + ["w1", "w2", "w3"]:
            out[names[part].format(i=i)] = shapes.get(part, (h,))  # norms and the output-projection bias
    out[names["final_norm.weight"]] = (h,)
    if model.norm_type == "layernorm":
        out[names["final_norm.bias"]] = (h,)
    out[names["head"]] = shapes["head"]
    return out


def logical_keys(model: ModelConfig) -> list[str]:
    """Every key of the logical state dict, in InternEvo's module order."""
    return list(logical_shapes(model))


def model_units(model: ModelConfig) -> list[list[str]]:
    """The logical keys of each unit, in model order: embedding, layer 0 … layer L-1, final norm and head."""
    names = LOGICAL_NAMES[model.family]
    layer_of = {}
    for key in logical_keys(model):
        rest = key.split(".", 2)
        layer_of[key] = int(rest[1]) if rest[0] in ("blocks", "layers") else None
    units: list[list[str]] = [[names["embedding"]]] + [[] for _ in range(model.num_layers)] + [[]]
    for key, layer in layer_of.items():
        if layer is not None:
            units[1 + layer].append(key)
        elif key != names["embedding"]:
            units[-1].append(key)
    return units


def qkv_from_grouped(model: ModelConfig, t: torch.Tensor) -> torch.Tensor:
    """Megatron's per-kv-head grouping of the fused qkv (weight or bias) → the logical layout."""
    if model.family == "internlm2":
        return t
    nh, d = model.num_attention_heads, model.head_dim
    return t.reshape(nh, 3, d, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _chunk(t: torch.Tensor, tp: int, rank: int, dim: int = 0, copy: bool = True) -> torch.Tensor:
    if t.shape[dim] % tp:
        raise ValueError(f"dimension {dim} of a {tuple(t.shape)} tensor does not split into {tp} equal parts")
    piece = t.chunk(tp, dim=dim)[rank]
    return piece.clone() if copy else piece  # a view would keep the whole tensor alive


def _qkv_chunk(model: ModelConfig, t: torch.Tensor, tp: int, rank: int, copy: bool = True) -> torch.Tensor:
    """Rank ``rank``'s rows of the logical fused qkv in megatron's per-kv-head grouping (module docstring),
    regrouping only this rank's heads."""
    if model.family == "internlm2":
        return _chunk(t, tp, rank, copy=copy)
    nh, d = model.num_attention_heads, model.head_dim
    if nh % tp:
        raise ValueError(f"{nh} attention heads do not split into {tp} equal parts")
    per = nh // tp
    mine = t.reshape(3, nh, d, *t.shape[1:])[:, rank * per:(rank + 1) * per]
    out = mine.transpose(0, 1).reshape(3 * per * d, *t.shape[1:])
    # the reshape copies unless nothing moved (tp = 1 with one head); the result must own its storage
    return out.clone() if out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() else out


def chunk_state_dict(logical: Mapping[str, torch.Tensor], model: ModelConfig, layout: ParallelLayout,
                     pp_rank: int, vp_stage: int, tp_rank: int, copy: bool = True) -> dict[str, torch.Tensor]:
    """The megatron-core state dict of chunk ``vp_stage`` on pipeline rank ``pp_rank``, tensor rank ``tp_rank``.
    With ``copy=False`` pieces that are plain slices stay views of the logical tensors."""
    tp = layout.tp
    names = LOGICAL_NAMES[model.family]
    start, end = layout.stages[pp_rank][vp_stage]
    first = pp_rank == 0 and vp_stage == 0
    last = pp_rank == layout.pp - 1 and vp_stage == layout.vpp - 1
    out: dict[str, torch.Tensor] = {}
    if first:
        out[MCORE_NAMES["embedding"]] = _chunk(logical[names["embedding"]], tp, tp_rank, copy=copy)
    for local, i in enumerate(range(start, end)):
        def get(part: str) -> torch.Tensor:
            return logical[names[part].format(i=i)]

        def put(part: str, value: torch.Tensor) -> None:
            out[MCORE_NAMES[part].format(i=local)] = value

        put("qkv.weight", _qkv_chunk(model, get("qkv.weight"), tp, tp_rank, copy=copy))
        if model.qkv_bias:
            put("qkv.bias", _qkv_chunk(model, get("qkv.bias"), tp, tp_rank, copy=copy))
        put("proj.weight", _chunk(get("proj.weight"), tp, tp_rank, dim=1, copy=copy))
        if model.out_proj_bias:
            put("proj.bias", _chunk(get("proj.bias"), 1, 0, copy=copy))  # replicated, added once after the reduction
        for norm in ("norm1", "norm2"):
            put(f"{norm}.weight", _chunk(get(f"{norm}.weight"), 1, 0, copy=copy))
            if model.norm_type == "layernorm":
                put(f"{norm}.bias", _chunk(get(f"{norm}.bias"), 1, 0, copy=copy))
        put("fc1", torch.cat([_chunk(get("w1"), tp, tp_rank), _chunk(get("w3"), tp, tp_rank)]))
        put("w2", _chunk(get("w2"), tp, tp_rank, dim=1, copy=copy))
    if last:
        out[MCORE_NAMES["final_norm.weight"]] = _chunk(logical[names["final_norm.weight"]], 1, 0, copy=copy)
        if model.norm_type == "layernorm":
            out[MCORE_NAMES["final_norm.bias"]] = _chunk(logical[names["final_norm.bias"]], 1, 0, copy=copy)
        out[MCORE_NAMES["head"]] = _chunk(logical[names["head"]], tp, tp_rank, copy=copy)
    return out


def expected_chunk(model: ModelConfig, layout: ParallelLayout, pp_rank: int, vp_stage: int,
                   tp_rank: int) -> dict[str, torch.Tensor]:
    """``chunk_state_dict`` from the model's sizes alone: every tensor as a ``meta`` tensor (fp32)."""
    logical = {k: torch.empty(s, device="meta") for k, s in logical_shapes(model).items()}
    return chunk_state_dict(logical, model, layout, pp_rank, vp_stage, tp_rank, copy=False)


def logical_from_chunk(shards: list[Mapping[str, torch.Tensor]], model: ModelConfig, layout: ParallelLayout,
                       pp_rank: int, vp_stage: int) -> dict[str, torch.Tensor]:
    """Inverse of ``chunk_state_dict``: the logical tensors held by one chunk, from all its tensor ranks."""
    names = LOGICAL_NAMES[model.family]
    start, end = layout.stages[pp_rank][vp_stage]
    out: dict[str, torch.Tensor] = {}

    def cat(key: str, dim: int = 0) -> torch.Tensor:
        return torch.cat([s[key] for s in shards], dim=dim)

    if MCORE_NAMES["embedding"] in shards[0]:
        out[names["embedding"]] = cat(MCORE_NAMES["embedding"])
    for local, i in enumerate(range(start, end)):
        def key(part: str) -> str:
            return MCORE_NAMES[part].format(i=local)

        def put(part: str, value: torch.Tensor) -> None:
            out[names[part].format(i=i)] = value

        put("qkv.weight", qkv_from_grouped(model, cat(key("qkv.weight"))))
        if model.qkv_bias:
            put("qkv.bias", qkv_from_grouped(model, cat(key("qkv.bias"))))
        put("proj.weight", cat(key("proj.weight"), dim=1))
        if model.out_proj_bias:
            put("proj.bias", shards[0][key("proj.bias")].clone())
        for norm in ("norm1", "norm2"):
            put(f"{norm}.weight", shards[0][key(f"{norm}.weight")].clone())
            if model.norm_type == "layernorm":
                put(f"{norm}.bias", shards[0][key(f"{norm}.bias")].clone())
        gate_up = [s[key("fc1")].chunk(2, dim=0) for s in shards]
        put("w1", torch.cat([g for g, _ in gate_up]))
        put("w3", torch.cat([u for _, u in gate_up]))
        put("w2", cat(key("w2"), dim=1))
    if MCORE_NAMES["head"] in shards[0]:
        out[names["final_norm.weight"]] = shards[0][MCORE_NAMES["final_norm.weight"]].clone()
        if model.norm_type == "layernorm":
            out[names["final_norm.bias"]] = shards[0][MCORE_NAMES["final_norm.bias"]].clone()
        out[names["head"]] = cat(MCORE_NAMES["head"])
    return out


def model_state(chunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A chunk's parameters by megatron-core name (no ``_extra_state`` entries)."""
    return {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}
