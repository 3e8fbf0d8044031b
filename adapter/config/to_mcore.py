"""InternEvo config → megatron-core ``TransformerConfig`` plus what building the model needs.

The ``TransformerConfig`` is really constructed, so megatron-core's own ``__post_init__`` validates it.
What it cannot hold (vocabulary, rotary base, the InternLM1 output-projection bias, the family) goes in
``ModelOptions``. The parallel layout is passed to megatron-core as an explicit
``pipeline_model_parallel_layout`` so that layers land on pipeline stages and virtual chunks exactly as
InternEvo's ``partition_uniform`` puts them, uneven splits included.

Importing this module imports torch and megatron-core.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from adapter.config.errors import ConfigError
from adapter.config.schema import Family, InternLMConfig
from adapter.runtime.layout import ParallelLayout

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ModelOptions:
    """Model facts that are not ``TransformerConfig`` fields."""

    family: Family
    vocab_size: int
    max_sequence_length: int
    rotary_base: float
    qkv_bias: bool
    out_proj_bias: bool
    """InternLM1 (and InternLM2 or LLAMA2 with ``no_bias=False``) has a bias on the attention output projection
    but none on the MLP; megatron-core's ``add_bias_linear`` covers both, so the layer spec adds this one."""
    position_embedding_type: str = "rope"
    rotary_percent: float = 1.0
    share_embeddings_and_output_weights: bool = False
    parallel_output: bool = True
    recompute_ratio: float = 0.0
    """InternEvo's ``model.checkpoint``: each chunk recomputes its first ``int(layers * ratio)`` layers. The
    builder gives every chunk its own count (``TransformerConfig`` holds one number, the first chunk's)."""


def pipeline_layout(layout: ParallelLayout) -> list[list[str]] | None:
    """megatron-core's ``pipeline_model_parallel_layout`` for InternEvo's partition (``None`` without PP).

    The list is ordered vpp-major (chunk 0 of every stage, then chunk 1 ...), which is the order of
    InternEvo's chunks too: chunk ``k`` of stage ``p`` holds layers ``stages[p][k]``.
    """
    if layout.pp == 1:
        return None
    rows: list[list[str]] = []
    for chunk in range(layout.vpp):
        for stage in range(layout.pp):
            start, end = layout.stages[stage][chunk]
            row = ["decoder"] * (end - start)
            if chunk == 0 and stage == 0:
                row.insert(0, "embedding")
            if chunk == layout.vpp - 1 and stage == layout.pp - 1:
                row.append("loss")
            rows.append(row)
    return rows


def _recompute(cfg: InternLMConfig, layout: ParallelLayout) -> dict[str, Any]:
    """InternEvo recomputes the first ``int(local_layers * ratio)`` layers of every chunk."""
    ratio = cfg.model.checkpoint
    if ratio <= 0:
        return {}
    if ratio >= 1:
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    first_chunk = layout.stages[0][0]
    n = int((first_chunk[1] - first_chunk[0]) * ratio)
    if n == 0:
        return {}
    return {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": n}


def translated_fields(cfg: InternLMConfig, layout: ParallelLayout) -> dict[str, Any]:
    """The ``TransformerConfig`` keyword arguments that the translation sets (the rest keep defaults)."""
    m = cfg.model
    dtype = TORCH_DTYPES[m.dtype]
    vpp = layout.vpp if layout.vpp > 1 else None
    overlap = cfg.parallel.interleaved_overlap and vpp is not None
    kwargs: dict[str, Any] = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_kv_attention_heads,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm" if m.norm_type == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=m.layer_norm_epsilon,
        gated_linear_unit=True,  # SwiGLU: w2(silu(w1 x) * w3 x)
        activation_func=F.silu,
        bias_activation_fusion=False,
        add_bias_linear=False,  # no MLP bias in any family; the output-projection bias is in the spec
        add_qkv_bias=m.qkv_bias,
        hidden_dropout=m.drop_rate,
        attention_dropout=m.attn_drop_rate,
        fp32_residual_connection=m.residual_in_fp32,
        rotary_interleaved=m.qk_interleaved,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        bf16=m.dtype == "bf16",
        fp16=m.dtype == "fp16",
        params_dtype=dtype,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=layout.sequence_parallel,
        pipeline_model_parallel_layout=pipeline_layout(layout),
        # InternEvo's interleaved_overlap ⇔ megatron's overlapped p2p; megatron forbids batching with it
        overlap_p2p_comm=overlap,
        batch_p2p_comm=not overlap,
        **_recompute(cfg, layout),
    )
    return kwargs


def transformer_config(cfg: InternLMConfig, layout: ParallelLayout, **overrides: Any) -> TransformerConfig:
    """Build and validate the megatron-core ``TransformerConfig`` for ``cfg`` laid out as ``layout``.

    ``overrides`` are runtime choices that are not part of the translation (``use_cpu_initialization``,
    ``batch_p2p_comm`` on gloo, ...).
    """
    kwargs = {**translated_fields(cfg, layout), **overrides}
    try:
        return TransformerConfig(**kwargs)
    except (ValueError, AssertionError) as exc:
        raise ConfigError("model", f"megatron-core rejected the translated TransformerConfig: {exc}") from exc


def model_options(cfg: InternLMConfig) -> ModelOptions:
    m = cfg.model
    return ModelOptions(
        family=m.family,
        vocab_size=m.vocab_size,
        max_sequence_length=cfg.data.seq_len,
        rotary_base=m.rope_base,
        qkv_bias=m.qkv_bias,
        out_proj_bias=m.out_proj_bias,
        parallel_output=m.parallel_output,
        recompute_ratio=m.checkpoint,
    )


def plain_fields(cfg: InternLMConfig, layout: ParallelLayout) -> dict[str, Any]:
    """``translated_fields`` as YAML/JSON-friendly values (dtypes and functions by name)."""
    return {k: _plain(v) for k, v in translated_fields(cfg, layout).items()}


def _plain(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, enum.Enum):
        return value.name
    if callable(value):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
