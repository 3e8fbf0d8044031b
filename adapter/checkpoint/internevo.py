"""InternEvo's sharded model files (``model_tp{t}_pp{p}.pt``) ⇄ the logical (tp=1, pp=1) state dict.

What one file holds (InternEvo 0.5.2, modes mtp/msp/fsp; ``INTERNEVO_FORMAT.md`` §3-4, §9):

* the layers of pipeline stage ``p``, numbered from 0 *per chunk*; with ``num_chunks > 1`` every key of
  chunk ``k`` is prefixed ``"{k}.model."``; the embedding sits in the chunk that starts at layer 0 and the
  final norm and head in the chunk that ends at the last layer;
* tensor rank ``t``'s slice of each tensor: column-parallel weights (``Wqkv``/``wqkv``, ``w1``, ``w3``) on
  rows, row-parallel weights (``out_proj``/``wo``, ``w2``) on columns, the embedding on *hidden* columns,
  the head on vocabulary rows with the first ranks one row larger when ``V % tp != 0``; norms whole in every
  file; a row-parallel bias only in the ``t = 0`` file;
* InternLM1's ``Wqkv`` shard is ``[Q_t; K_t; V_t]`` (each rank's own heads), not a slice of ``[Q; K; V]``;
  InternLM2's grouped ``wqkv`` shard is a plain slice of whole kv groups.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch

from adapter.config.schema import ModelConfig
from adapter.model.mapping import LOGICAL_NAMES
from adapter.runtime.layout import ParallelLayout

#: Per-layer tensors in InternEvo's file order. InternLM1's ``Wqkv`` comes after ``out_proj``: a state-dict
#: hook renames ``wqkv`` → ``Wqkv`` by popping and re-inserting the keys.
_LAYER_PARTS = {
    "internlm1": ("proj.weight", "proj.bias", "qkv.weight", "qkv.bias", "norm1.weight", "norm1.bias", "norm2.weight",
                  "norm2.bias", "w1", "w2", "w3"),
    "internlm2": ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "norm1.weight", "norm1.bias", "norm2.weight",
                  "norm2.bias", "w1", "w2", "w3"),
}


def split_sizes(n: int, parts: int) -> list[int]:
    """InternEvo's uneven split: rank ``r`` gets ``n // parts + (r < n % parts)`` (first ranks larger)."""
    return [n // parts + (r < n % parts) for r in range(parts)]


def _slice(t: torch.Tensor, dim: int, parts: int, rank: int, uneven: bool = False, copy: bool = True) -> torch.Tensor:
    n = t.shape[dim]
    sizes = split_sizes(n, parts) if uneven else [n // parts] * parts
    if not uneven and n % parts:
        raise ValueError(f"dimension {dim} of a {tuple(t.shape)} tensor does not split into {parts} equal parts")
    start = sum(sizes[:rank])
    piece = t.narrow(dim, start, sizes[rank])
    return piece.clone() if copy else piece


def _qkv_shard(model: ModelConfig, t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    if model.family == "internlm2":
        return _slice(t, 0, tp, rank)
    h = model.hidden_size
    return _own(t.reshape(3, tp, h // tp, *t.shape[1:])[:, rank].reshape(3 * h // tp, *t.shape[1:]), t)


def _own(out: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``out``, cloned only if it is still a view of ``source`` (a reshape that had to copy already did)."""
    return out.clone() if out.untyped_storage().data_ptr() == source.untyped_storage().data_ptr() else out


def _qkv_merge(model: ModelConfig, shards: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    if model.family == "internlm2":
        return torch.cat(shards, 0, out=out)
    per = [s.reshape(3, s.shape[0] // 3, *s.shape[1:]) for s in shards]
    if out is not None:
        torch.cat(per, 1, out=out.view(3, -1, *out.shape[1:]))
        return out
    merged = torch.cat(per, 1)
    return merged.reshape(merged.shape[0] * merged.shape[1], *merged.shape[2:])


def _present(model: ModelConfig, part: str) -> bool:
    if part == "qkv.bias":
        return model.qkv_bias
    if part == "proj.bias":
        return model.out_proj_bias
    if part.endswith(".bias"):  # norm biases
        return model.norm_type == "layernorm"
    return True


def shard_state_dict(logical: Mapping[str, torch.Tensor], model: ModelConfig, layout: ParallelLayout,
                     tp_rank: int, pp_rank: int) -> "OrderedDict[str, torch.Tensor]":
    """The content of ``model_tp{tp_rank}_pp{pp_rank}.pt`` for the logical weights."""
    return stage_state_dicts(logical, model, layout, pp_rank, [tp_rank])[0]


def stage_state_dicts(logical: Mapping[str, torch.Tensor], model: ModelConfig, layout: ParallelLayout,
                      pp_rank: int, tp_ranks: list[int] | None = None,
                      copy: bool = True) -> "list[OrderedDict[str, torch.Tensor]]":
    """The files of tensor ranks ``tp_ranks`` (default: all) of stage ``pp_rank``, reading each logical
    tensor once for all of them. With ``copy=False`` pieces that are plain slices stay views of the
    logical tensors (for a writer that copies bytes out itself; ``torch.save`` would store whole storages)."""
    names, tp, chunks = LOGICAL_NAMES[model.family], layout.tp, layout.vpp
    ranks = list(range(tp)) if tp_ranks is None else tp_ranks
    outs: list[OrderedDict[str, torch.Tensor]] = [OrderedDict() for _ in ranks]

    def split(key: str, value: torch.Tensor, how) -> None:
        for r, out in zip(ranks, outs):
            piece = how(value, r)
            if piece is not None:
                out[key] = piece

    for chunk, (start, end) in enumerate(layout.stages[pp_rank]):
        prefix = f"{chunk}.model." if chunks > 1 else ""
        if start == 0:
            split(prefix + names["embedding"], logical[names["embedding"]], lambda t, r: _slice(t, 1, tp, r, copy=copy))
        for j, i in enumerate(range(start, end)):
            for part in _LAYER_PARTS[model.family]:
                if not _present(model, part):
                    continue
                key, value = prefix + names[part].format(i=j), logical[names[part].format(i=i)]
                if part.startswith("qkv"):
                    split(key, value, lambda t, r: _qkv_shard(model, t, tp, r))
                elif part in ("proj.weight", "w2"):
                    split(key, value, lambda t, r: _slice(t, 1, tp, r, copy=copy))
                elif part == "proj.bias":  # a row-parallel bias lives only in the tp-0 file
                    split(key, value, lambda t, r: _slice(t, 0, 1, 0, copy=copy) if r == 0 else None)
                elif part in ("w1", "w3"):
                    split(key, value, lambda t, r: _slice(t, 0, tp, r, copy=copy))
                else:
                    split(key, value, lambda t, r: _slice(t, 0, 1, 0, copy=copy))
        if end == model.num_layers:
            whole = lambda t, r: _slice(t, 0, 1, 0, copy=copy)  # noqa: E731
            split(prefix + names["final_norm.weight"], logical[names["final_norm.weight"]], whole)
            if model.norm_type == "layernorm":
                split(prefix + names["final_norm.bias"], logical[names["final_norm.bias"]], whole)
            split(prefix + names["head"], logical[names["head"]],
                  lambda t, r: _slice(t, 0, tp, r, uneven=True, copy=copy))
    return outs


def stage_sources(model: ModelConfig, layout: ParallelLayout, pp_rank: int) -> dict[str, tuple[str, str]]:
    """Logical key → (key inside the stage's files, how the tensor-rank pieces merge), for stage ``pp_rank``.

    Merge kinds: ``hidden`` (the embedding, columns), ``qkv``, ``columns`` (row-parallel weights), ``rows``
    (column-parallel weights and the head), ``first`` (replicated tensors, and the row-parallel bias that
    only the tp-0 file holds)."""
    names = LOGICAL_NAMES[model.family]
    out: dict[str, tuple[str, str]] = {}
    for chunk, (start, end) in enumerate(layout.stages[pp_rank]):
        prefix = f"{chunk}.model." if layout.vpp > 1 else ""
        if start == 0:
            out[names["embedding"]] = (prefix + names["embedding"], "hidden")
        for j, i in enumerate(range(start, end)):
            for part in _LAYER_PARTS[model.family]:
                if _present(model, part):
                    kind = ("qkv" if part.startswith("qkv") else "columns" if part in ("proj.weight", "w2")
                            else "rows" if part in ("w1", "w3") else "first")
                    out[names[part].format(i=i)] = (prefix + names[part].format(i=j), kind)
        if end == model.num_layers:
            out[names["final_norm.weight"]] = (prefix + names["final_norm.weight"], "first")
            if model.norm_type == "layernorm":
                out[names["final_norm.bias"]] = (prefix + names["final_norm.bias"], "first")
            out[names["head"]] = (prefix + names["head"], "rows")
    return out


def merge(model: ModelConfig, kind: str, pieces: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """One logical tensor from its per-tensor-rank pieces (``stage_sources`` names the kind), written into
    ``out`` when given (then always a copy; without it, ``first`` returns the tp-0 piece itself)."""
    if kind == "qkv":
        return _qkv_merge(model, pieces, out)
    if kind in ("hidden", "columns"):
        return torch.cat(pieces, 1, out=out)
    if kind == "rows":
        return torch.cat(pieces, 0, out=out)
    return pieces[0] if out is None else out.copy_(pieces[0])


def model_config_dict(model: ModelConfig) -> dict:
    """``model_config.pt`` content: the model section in InternEvo's own keys, as a plain dict."""
    out = {
        "num_layers": model.num_layers, "hidden_size": model.hidden_size,
        "num_attention_heads": model.num_attention_heads, "vocab_size": model.vocab_size,
        "mlp_ratio": model.mlp_ratio, "multiple_of": model.multiple_of, "norm_type": model.norm_type,
        "layer_norm_epsilon": model.layer_norm_epsilon, "checkpoint": model.checkpoint,
        "num_chunks": model.num_chunks, "use_flash_attn": model.use_flash_attn, "rope_base": model.rope_base,
        "qk_interleaved": model.qk_interleaved, "embed_grad_scale": model.embed_grad_scale,
        "parallel_output": model.parallel_output, "embed_split_hidden": True, "apply_post_layer_norm": False,
        "max_position_embeddings": model.max_position_embeddings,
        "dtype": {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}[model.dtype],
    }
    if model.family == "internlm2":
        out.update(num_kv_attention_heads=model.num_kv_attention_heads, no_bias=model.no_bias)
    return out
