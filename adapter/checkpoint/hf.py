"""InternEvo's logical state dict ⇄ Hugging Face ``LlamaForCausalLM`` (and InternLM2's official naming).

Both families load into transformers' own Llama, so an exported model needs no ``trust_remote_code``:

* InternLM1 is Llama with biases on q/k/v/o (``attention_bias=True``; its MLP has none, ``mlp_bias=False``).
* InternLM2 is Llama with grouped-query attention once its fused ``wqkv`` is unpacked; its q/k/v/o biases
  exist exactly when ``no_bias`` is False, which is again ``attention_bias``.

Both use rotate-half RoPE (InternEvo's default ``qk_interleaved=False``) with ``rope_theta = rope_base``,
the same convention as HF Llama, so the q/k rows need no permutation. ``qk_interleaved=True`` models (GPT-J
pairs) and LayerNorm models do not map onto Llama as-is and are refused rather than silently mis-exported.

Fused qkv layouts (rows of a ``[(nh + 2·nkv)·d, H]`` weight, and of its bias; ``g = nh / nkv``, ``d`` rows each):

* InternLM1 ``Wqkv``: ``[Q; K; V]``, each head-major: exactly ``cat([q_proj, k_proj, v_proj], 0)``.
* InternLM2 ``wqkv``: for kv head ``j``: ``[q_{j·g} … q_{j·g+g-1}, k_j, v_j]``, i.e.
  ``rearrange(w, "(nkv gs d) H -> nkv gs d H", gs=g + 2)``. The published InternLM2 HF checkpoints
  (remote-code ``InternLM2ForCausalLM``) use this same layout under ``attention.wqkv``, so reading them is a
  pure rename.

Every conversion only renames, slices, reshapes and concatenates: no arithmetic, dtypes kept, so
``hf_to_internevo(internevo_to_hf(sd, m), m)`` equals ``sd`` bit for bit. Inputs are checked key by key and
shape by shape up front, and a ``ValueError`` names the first offending tensor: a checkpoint that is
half-converted or built for another size should fail here, not as a shape error deep inside a load.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import torch

from adapter.config.schema import ModelConfig
from adapter.model.mapping import LOGICAL_NAMES, logical_keys, logical_shapes

_TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

#: logical part (see ``adapter.model.mapping.LOGICAL_NAMES``) → HF Llama name; ``{i}`` is the layer.
#: ``qkv.*`` is absent: it fans out into ``q_proj``/``k_proj``/``v_proj``.
_LLAMA = {
    "embedding": "model.embed_tokens.weight",
    "proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "proj.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "w1": "model.layers.{i}.mlp.gate_proj.weight",
    "w3": "model.layers.{i}.mlp.up_proj.weight",
    "w2": "model.layers.{i}.mlp.down_proj.weight",
    "norm1.weight": "model.layers.{i}.input_layernorm.weight",
    "norm2.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "final_norm.weight": "model.norm.weight",
    "head": "lm_head.weight",
}
#: logical part → InternLM2's official remote-code names (``InternLM2ForCausalLM``); a 1:1 rename.
_OFFICIAL = {
    "embedding": "model.tok_embeddings.weight",
    "qkv.weight": "model.layers.{i}.attention.wqkv.weight",
    "qkv.bias": "model.layers.{i}.attention.wqkv.bias",
    "proj.weight": "model.layers.{i}.attention.wo.weight",
    "proj.bias": "model.layers.{i}.attention.wo.bias",
    "w1": "model.layers.{i}.feed_forward.w1.weight",
    "w3": "model.layers.{i}.feed_forward.w3.weight",
    "w2": "model.layers.{i}.feed_forward.w2.weight",
    "norm1.weight": "model.layers.{i}.attention_norm.weight",
    "norm2.weight": "model.layers.{i}.ffn_norm.weight",
    "final_norm.weight": "model.norm.weight",
    "head": "output.weight",
}
_QKV = ("q_proj", "k_proj", "v_proj")
#: Buffers that older transformers / remote code saved; they are recomputed from the config, so they are
#: skipped on import instead of being reported as unexpected.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_config(model: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` dict that makes transformers' ``LlamaForCausalLM`` compute this model.

    ``rope_theta`` is written both flat (transformers 4.x, and what ``hf_io`` reads back) and inside
    ``rope_parameters`` (transformers 5.x); ``torch_dtype`` and ``dtype`` likewise. InternLM1 has no GQA, so
    ``num_key_value_heads == num_attention_heads`` there. Dynamic-NTK RoPE (InternLM1 only) becomes
    ``rope_type="dynamic"`` with factor 1: InternEvo's ``DynamicNTKScalingRotaryEmbedding`` uses the same
    base-rescaling formula and only departs from plain RoPE past ``max_position_embeddings``.
    """
    _check_supported(model)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(model.rope_base)}
    if model.use_dynamic_ntk_rope:
        rope = {"rope_type": "dynamic", "factor": 1.0, "rope_theta": float(model.rope_base)}
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
        "rope_theta": float(model.rope_base),
        "rope_scaling": None if rope["rope_type"] == "default" else dict(rope),
        "rope_parameters": rope,
        "max_position_embeddings": model.max_position_embeddings,
        "attention_bias": model.qkv_bias,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": _TORCH_DTYPE[model.dtype],
        "dtype": _TORCH_DTYPE[model.dtype],
    }


def internevo_to_hf(state_dict: Mapping[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Logical InternEvo tensors → a ``LlamaForCausalLM`` state dict (``load_state_dict(strict=True)``-ready).

    Keys come out in Llama's module order. The q/k/v pieces are cloned out of the fused tensor so that each
    owns its storage (safetensors refuses tensors that share memory); every other tensor is passed through.
    """
    return dict(iter_hf_tensors(state_dict, model))


def iter_hf_tensors(state_dict: Mapping[str, torch.Tensor], model: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """``internevo_to_hf`` one tensor at a time, reading each logical tensor only when its turn comes, so a
    lazily read source is converted without holding the model. Key sets are checked first; each shape as
    the tensor is read."""
    _check_supported(model)
    expected = logical_shapes(model)
    _check(state_dict, expected, "InternEvo state dict", shapes=False)
    names = LOGICAL_NAMES[model.family]

    def get(key: str) -> torch.Tensor:
        value = state_dict[key]
        if tuple(value.shape) != expected[key]:
            raise ValueError(f"InternEvo state dict: tensor {key} has shape {tuple(value.shape)}, "
                             f"expected {expected[key]}")
        return value

    yield _LLAMA["embedding"], get(names["embedding"])
    for i in range(model.num_layers):
        for suffix in _qkv_suffixes(model):
            pieces = _split_qkv(model, get(names[f"qkv.{suffix}"].format(i=i)))
            for proj, piece in zip(_QKV, pieces):
                yield f"model.layers.{i}.self_attn.{proj}.{suffix}", piece
        for part in _plain_parts(model):
            yield _LLAMA[part].format(i=i), get(names[part].format(i=i))
    yield _LLAMA["final_norm.weight"], get(names["final_norm.weight"])
    yield _LLAMA["head"], get(names["head"])


def hf_to_internevo(state_dict: Mapping[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """A ``LlamaForCausalLM`` state dict, or InternLM2's official HF one, → logical InternEvo tensors.

    The official ``InternLM2ForCausalLM`` naming (``model.tok_embeddings``, ``attention.wqkv``, ``output``)
    is recognised from the keys, so training can continue from published InternLM2 weights; its ``wqkv`` is
    already InternEvo's layout. Keys come out in InternEvo's module order (``logical_keys``).
    """
    _check_supported(model)
    official = _looks_official(state_dict)
    if official and model.family != "internlm2":
        raise ValueError("Hugging Face state dict uses InternLM2's official naming (model.tok_embeddings, "
                         f"attention.wqkv) but the model family is {model.family}")
    table = _OFFICIAL if official else _LLAMA
    names = LOGICAL_NAMES[model.family]
    shapes = logical_shapes(model)
    d, nh, nkv = model.head_dim, model.num_attention_heads, model.num_kv_attention_heads

    expected: dict[str, tuple[int, ...]] = {}
    for part in ("embedding", "final_norm.weight", "head"):
        expected[table[part]] = shapes[names[part]]
    for i in range(model.num_layers):
        for suffix in _qkv_suffixes(model):
            shape = shapes[names[f"qkv.{suffix}"].format(i=i)]
            if official:
                expected[table[f"qkv.{suffix}"].format(i=i)] = shape
            else:
                for proj, heads in zip(_QKV, (nh, nkv, nkv)):
                    expected[f"model.layers.{i}.self_attn.{proj}.{suffix}"] = (heads * d, *shape[1:])
        for part in _plain_parts(model):
            expected[table[part].format(i=i)] = shapes[names[part].format(i=i)]
    tensors = {k: v for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIXES)}
    _check(tensors, expected, "Hugging Face state dict")

    out: dict[str, torch.Tensor] = {}
    for part in ("embedding", "final_norm.weight", "head"):
        out[names[part]] = tensors[table[part]]
    for i in range(model.num_layers):
        for suffix in _qkv_suffixes(model):
            key = names[f"qkv.{suffix}"].format(i=i)
            if official:
                out[key] = tensors[table[f"qkv.{suffix}"].format(i=i)]
            else:
                q, k, v = (tensors[f"model.layers.{i}.self_attn.{p}.{suffix}"] for p in _QKV)
                out[key] = _join_qkv(model, q, k, v)
        for part in _plain_parts(model):
            out[names[part].format(i=i)] = tensors[table[part].format(i=i)]
    return {k: out[k] for k in logical_keys(model)}


def _check_supported(model: ModelConfig) -> None:
    """Refuse models whose math Llama does not reproduce (rather than export wrong weights silently)."""
    if model.norm_type != "rmsnorm":
        raise ValueError(f"norm_type {model.norm_type!r}: only RMSNorm models map onto transformers' Llama")
    if model.qk_interleaved:
        raise ValueError("qk_interleaved=True (GPT-J style RoPE) needs a q/k row permutation that this "
                         "mapping does not do; only rotate-half models map onto transformers' Llama")
    if model.num_attention_heads % model.num_kv_attention_heads:
        raise ValueError(f"num_attention_heads {model.num_attention_heads} is not a multiple of "
                         f"num_kv_attention_heads {model.num_kv_attention_heads}")


def _qkv_suffixes(model: ModelConfig) -> tuple[str, ...]:
    return ("weight", "bias") if model.qkv_bias else ("weight",)


def _plain_parts(model: ModelConfig) -> list[str]:
    """Per-layer logical parts that map 1:1 (everything but the fused qkv), in Llama's module order."""
    parts = ["proj.weight"] + (["proj.bias"] if model.out_proj_bias else [])
    return parts + ["w1", "w3", "w2", "norm1.weight", "norm2.weight"]


def _split_qkv(model: ModelConfig, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused logical qkv (weight ``[R, H]`` or bias ``[R]``) → HF ``q_proj``, ``k_proj``, ``v_proj``."""
    nh, nkv, d = model.num_attention_heads, model.num_kv_attention_heads, model.head_dim
    rest = tuple(t.shape[1:])
    if model.family == "internlm1":  # [Q; K; V]
        q, k, v = t.split([nh * d, nkv * d, nkv * d])
        return q.clone(), k.clone(), v.clone()
    g = nh // nkv
    grouped = t.reshape(nkv, g + 2, d, *rest)  # per kv head: g query heads, then k, then v
    q = grouped[:, :g].reshape(nh * d, *rest)  # query head j·g+m sits in group j: head-major order
    k = grouped[:, g].reshape(nkv * d, *rest)
    v = grouped[:, g + 1].reshape(nkv * d, *rest)
    return q.clone(), k.clone(), v.clone()


def _join_qkv(model: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_split_qkv``."""
    nh, nkv, d = model.num_attention_heads, model.num_kv_attention_heads, model.head_dim
    if model.family == "internlm1":
        return torch.cat([q, k, v])
    g = nh // nkv
    rest = tuple(q.shape[1:])
    grouped = torch.cat([q.reshape(nkv, g, d, *rest), k.reshape(nkv, 1, d, *rest), v.reshape(nkv, 1, d, *rest)], 1)
    return grouped.reshape((nh + 2 * nkv) * d, *rest)


def _looks_official(keys: Iterable[str]) -> bool:
    """Whether the keys use InternLM2's remote-code names rather than Llama's."""
    return any(k.startswith("model.tok_embeddings.") or ".attention.wqkv." in k or k == "output.weight"
               for k in keys)


def _first(keys: list[str]) -> str:
    return keys[0] + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")


def _check(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], what: str,
           shapes: bool = True) -> None:
    """Raise ``ValueError`` naming the first missing, unexpected or (with ``shapes``) wrongly shaped tensor."""
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ValueError(f"{what}: missing tensor {_first(missing)}")
    extra = [k for k in tensors if k not in expected]
    if extra:
        raise ValueError(f"{what}: unexpected tensor {_first(extra)}")
    for key, shape in expected.items() if shapes else ():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{what}: tensor {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
