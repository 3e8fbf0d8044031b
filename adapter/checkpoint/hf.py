"""InternEvo's logical state dict ⇄ Hugging Face ``LlamaForCausalLM`` (and InternLM2's official naming).

Both families load into transformers' Llama without remote code: InternLM1 is Llama with biases on
q/k/v/o (``attention_bias=True``, MLP without bias); InternLM2 is Llama with grouped-query attention once its
fused ``wqkv`` is unpacked. Both use rotate-half RoPE with ``rope_theta = rope_base``, so q/k rows need no
permutation (InternEvo's ``qk_interleaved=True`` models would; they are refused).

Fused qkv layouts (rows of a ``[(nh + 2·nkv)·d, H]`` weight):

* InternLM1 ``Wqkv``: ``[Q; K; V]``, each head-major: exactly ``cat([q_proj, k_proj, v_proj])``.
* InternLM2 ``wqkv``: per kv head ``j``: ``[q_{j·g} … q_{j·g+g-1}, k_j, v_j]`` (``g = nh / nkv``, ``d`` rows
  each). InternLM2's published HF checkpoints use the same layout under ``attention.wqkv``.
"""

from __future__ import annotations

from typing import Mapping

import torch

from adapter.config.schema import ModelConfig
from adapter.model.mapping import LOGICAL_NAMES, logical_keys

_TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

#: logical part → HF Llama name (``{i}`` is the layer)
_HF = {
    "embedding": "model.embed_tokens.weight",
    "proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "proj.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "norm1.weight": "model.layers.{i}.input_layernorm.weight",
    "norm2.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "w1": "model.layers.{i}.mlp.gate_proj.weight",
    "w3": "model.layers.{i}.mlp.up_proj.weight",
    "w2": "model.layers.{i}.mlp.down_proj.weight",
    "final_norm.weight": "model.norm.weight",
    "head": "lm_head.weight",
}
#: InternLM2's official remote-code names (``InternLM2ForCausalLM``)
_OFFICIAL = {
    "embedding": "model.tok_embeddings.weight",
    "qkv.weight": "model.layers.{i}.attention.wqkv.weight",
    "qkv.bias": "model.layers.{i}.attention.wqkv.bias",
    "proj.weight": "model.layers.{i}.attention.wo.weight",
    "proj.bias": "model.layers.{i}.attention.wo.bias",
    "norm1.weight": "model.layers.{i}.attention_norm.weight",
    "norm2.weight": "model.layers.{i}.ffn_norm.weight",
    "w1": "model.layers.{i}.feed_forward.w1.weight",
    "w3": "model.layers.{i}.feed_forward.w3.weight",
    "w2": "model.layers.{i}.feed_forward.w2.weight",
    "final_norm.weight": "model.norm.weight",
    "head": "output.weight",
}
_QKV = ("q_proj", "k_proj", "v_proj")


def hf_config(model: ModelConfig) -> dict:
    """``config.json`` for ``LlamaForCausalLM``."""
    if model.qk_interleaved or model.norm_type != "rmsnorm":
        raise ValueError("only rotate-half RoPE and RMSNorm models map onto transformers' Llama")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_kv_attention_heads,
        "head_dim": model.head_dim,
        "vocab_size": model.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": model.layer_norm_epsilon,
        "rope_theta": model.rope_base,
        "max_position_embeddings": model.max_position_embeddings,
        "attention_bias": model.qkv_bias,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": _TORCH_DTYPE[model.dtype],
    }


def _split_qkv(model: ModelConfig, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nh, nkv, d = model.num_attention_heads, model.num_kv_attention_heads, model.head_dim
    if model.family == "internlm1":
        return tuple(x.clone() for x in t.split([nh * d, nkv * d, nkv * d]))  # type: ignore[return-value]
    g = nh // nkv
    grouped = t.reshape(nkv, g + 2, d, *t.shape[1:])
    q = grouped[:, :g].reshape(nh * d, *t.shape[1:])
    return q.clone(), grouped[:, g].reshape(nkv * d, *t.shape[1:]).clone(), \
        grouped[:, g + 1].reshape(nkv * d, *t.shape[1:]).clone()


def _join_qkv(model: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    nh, nkv, d = model.num_attention_heads, model.num_kv_attention_heads, model.head_dim
    if model.family == "internlm1":
        return torch.cat([q, k, v])
    g = nh // nkv
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(nkv, g, d, *rest), k.reshape(nkv, 1, d, *rest), v.reshape(nkv, 1, d, *rest)], 1)
    return grouped.reshape((nh + 2 * nkv) * d, *rest)


def _parts(model: ModelConfig) -> list[str]:
    parts = ["qkv.weight", "proj.weight", "norm1.weight", "norm2.weight", "w1", "w2", "w3"]
    if model.qkv_bias:
        parts.append("qkv.bias")
    if model.out_proj_bias:
        parts.append("proj.bias")
    return parts


def _check(tensors: Mapping[str, torch.Tensor], expected: dict[str, tuple], what: str) -> None:
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ValueError(f"{what}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = [k for k in tensors if k not in expected and not k.endswith("rotary_emb.inv_freq")]
    if extra:
        raise ValueError(f"{what}: unexpected tensor {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{what}: tensor {key} has shape {tuple(tensors[key].shape)}, expected {shape}")


def _logical_shapes(model: ModelConfig) -> dict[str, tuple]:
    h, f, v = model.hidden_size, model.ffn_hidden_size, model.vocab_size
    rows = (model.num_attention_heads + 2 * model.num_kv_attention_heads) * model.head_dim
    shapes = {"embedding": (v, h), "head": (v, h), "final_norm.weight": (h,), "qkv.weight": (rows, h),
              "qkv.bias": (rows,), "proj.weight": (h, h), "proj.bias": (h,), "norm1.weight": (h,),
              "norm2.weight": (h,), "w1": (f, h), "w3": (f, h), "w2": (h, f)}
    names = LOGICAL_NAMES[model.family]
    out = {names[p]: shapes[p] for p in ("embedding", "final_norm.weight", "head")}
    for i in range(model.num_layers):
        out.update({names[p].format(i=i): shapes[p] for p in _parts(model)})
    return out


def internevo_to_hf(state_dict: Mapping[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Logical InternEvo tensors → ``LlamaForCausalLM`` state dict (dtypes kept)."""
    if model.norm_type != "rmsnorm":
        raise ValueError("only RMSNorm models map onto transformers' Llama")
    _check(state_dict, _logical_shapes(model), "InternEvo state dict")
    names = LOGICAL_NAMES[model.family]
    out = {}
    for part in ("embedding", "final_norm.weight", "head"):
        out[_HF[part]] = state_dict[names[part]]
    for i in range(model.num_layers):
        for part in _parts(model):
            t = state_dict[names[part].format(i=i)]
            if part.startswith("qkv"):
                suffix = part.split(".")[1]
                for proj, piece in zip(_QKV, _split_qkv(model, t)):
                    out[f"model.layers.{i}.self_attn.{proj}.{suffix}"] = piece
            else:
                out[_HF[part].format(i=i)] = t
    return out


def hf_to_internevo(state_dict: Mapping[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """``LlamaForCausalLM`` (or official InternLM2 HF) tensors → logical InternEvo tensors."""
    names = LOGICAL_NAMES[model.family]
    official = any(k.startswith("model.tok_embeddings.") for k in state_dict)
    table = _OFFICIAL if official else _HF
    expected: dict[str, tuple] = {}
    logical_shapes = _logical_shapes(model)
    for part in ("embedding", "final_norm.weight", "head"):
        expected[table[part]] = logical_shapes[names[part]]
    d, nh, nkv = model.head_dim, model.num_attention_heads, model.num_kv_attention_heads
    for i in range(model.num_layers):
        for part in _parts(model):
            shape = logical_shapes[names[part].format(i=i)]
            if part.startswith("qkv") and not official:
                suffix = part.split(".")[1]
                for proj, heads in zip(_QKV, (nh, nkv, nkv)):
                    expected[f"model.layers.{i}.self_attn.{proj}.{suffix}"] = (heads * d, *shape[1:])
            else:
                expected[table[part].format(i=i)] = shape
    _check(state_dict, expected, "Hugging Face state dict")
    out = {}
    for part in ("embedding", "final_norm.weight", "head"):
        out[names[part]] = state_dict[table[part]]
    for i in range(model.num_layers):
        for part in _parts(model):
            if part.startswith("qkv") and not official:
                suffix = part.split(".")[1]
                q, k, v = (state_dict[f"model.layers.{i}.self_attn.{p}.{suffix}"] for p in _QKV)
                out[names[part].format(i=i)] = _join_qkv(model, q, k, v)
            else:
                out[names[part].format(i=i)] = state_dict[table[part].format(i=i)]
    return {k: out[k] for k in logical_keys(model) if k in out}
