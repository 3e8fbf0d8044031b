"""megatron-core's GPT state dict as a tensor table: the model the adapter builds, and both Megatron formats.

Names are those of megatron-core's local layer spec, per model chunk (layers numbered from 0 in each chunk).
``linear_qkv`` is grouped per kv head, ``linear_fc1`` is ``[gate_r; up_r]`` on every tensor rank; the
vocabulary-parallel embedding and output layer split on rows; the output-projection bias is replicated and
added once after the reduction. Transformer Engine's layer spec (Megatron-LM's default on GPUs) folds each
pre-norm into the linear layer after it; ``TE_NAMES`` reads those names as the local spec's.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

from adapter.config.schema import ModelConfig
from adapter.weights.stored import Stored
from adapter.weights.table import Table

_L = "decoder.layers.{i}."

#: Transformer Engine's fused names → the local spec's.
TE_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


@lru_cache(maxsize=None)
def mcore_table(model: ModelConfig) -> Table:
    groups = model.num_kv_attention_heads
    return Table.of(
        model,
        embedding=[Stored("embedding.word_embeddings.weight", ("embedding",), "rows")],
        layer=[
            Stored(_L + "self_attention.linear_qkv.weight", ("q.weight", "k.weight", "v.weight"), "rows", groups),
            Stored(_L + "self_attention.linear_qkv.bias", ("q.bias", "k.bias", "v.bias"), "rows", groups),
            Stored(_L + "self_attention.linear_proj.weight", ("o.weight",), "columns"),
            Stored(_L + "self_attention.linear_proj.bias", ("o.bias",)),
            Stored(_L + "input_layernorm.weight", ("norm1.weight",)),
            Stored(_L + "input_layernorm.bias", ("norm1.bias",)),
            Stored(_L + "pre_mlp_layernorm.weight", ("norm2.weight",)),
            Stored(_L + "pre_mlp_layernorm.bias", ("norm2.bias",)),
            Stored(_L + "mlp.linear_fc1.weight", ("gate", "up"), "rows"),
            Stored(_L + "mlp.linear_fc2.weight", ("down",), "columns"),
        ],
        final=[
            Stored("decoder.final_layernorm.weight", ("final_norm.weight",)),
            Stored("decoder.final_layernorm.bias", ("final_norm.bias",)),
            Stored("output_layer.weight", ("head",), "rows"),
        ],
    )


def local_spec_name(key: str) -> Optional[str]:
    """A megatron-core key (per-chunk or sharded) as the local spec names it; None for ``_extra_state``."""
    if key.endswith("_extra_state") or "._extra_state/" in key:
        return None
    for te, local in TE_NAMES.items():
        if key.endswith("." + te):
            return key[: -len(te)] + local
    return key
