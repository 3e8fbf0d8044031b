"""InternLM2 (InternEvo ``model_type="INTERNLM2_PUBLIC"``): grouped-query attention with a fused ``wqkv``,
biases on ``wqkv`` and ``wo`` unless ``no_bias``.

``wqkv`` is grouped per kv head (``"(h gs d)"``, ``gs = q heads per kv head + 2``): for kv head ``j``, its
query heads, then ``k_j``, then ``v_j``; a tensor rank's file holds whole groups, a plain slice. The
published HF checkpoints (remote-code ``InternLM2ForCausalLM``) use the same layout under other names, so
importing them is a rename; exports go to HF ``LlamaForCausalLM``.
"""

from __future__ import annotations

from functools import lru_cache

from adapter.config.schema import ModelConfig
from adapter.families import Family
from adapter.families.hf_llama import llama_table
from adapter.weights.stored import Stored
from adapter.weights.table import Table

_QKV = ("q.weight", "k.weight", "v.weight")
_QKV_BIAS = ("q.bias", "k.bias", "v.bias")


@lru_cache(maxsize=None)
def internevo_table(model: ModelConfig) -> Table:
    return _table(model, "", "layers.{i}.")


@lru_cache(maxsize=None)
def official_hf_table(model: ModelConfig) -> Table:
    """The names of InternLM's published ``InternLM2ForCausalLM`` checkpoints."""
    return _table(model, "model.", "model.layers.{i}.", head="output.weight")


def _table(model: ModelConfig, root: str, layer: str, head: str = "output.weight") -> Table:
    groups = model.num_kv_attention_heads
    return Table.of(
        model,
        embedding=[Stored(root + "tok_embeddings.weight", ("embedding",), "columns")],
        layer=[
            Stored(layer + "attention.wqkv.weight", _QKV, "rows", groups),
            Stored(layer + "attention.wqkv.bias", _QKV_BIAS, "rows", groups),
            Stored(layer + "attention.wo.weight", ("o.weight",), "columns"),
            Stored(layer + "attention.wo.bias", ("o.bias",), "first"),
            Stored(layer + "attention_norm.weight", ("norm1.weight",)),
            Stored(layer + "attention_norm.bias", ("norm1.bias",)),
            Stored(layer + "ffn_norm.weight", ("norm2.weight",)),
            Stored(layer + "ffn_norm.bias", ("norm2.bias",)),
            Stored(layer + "feed_forward.w1.weight", ("gate",), "rows"),
            Stored(layer + "feed_forward.w2.weight", ("down",), "columns"),
            Stored(layer + "feed_forward.w3.weight", ("up",), "rows"),
        ],
        final=[Stored(root + "norm.weight", ("final_norm.weight",)), Stored(root + "norm.bias", ("final_norm.bias",)),
               Stored(head, ("head",), "uneven_rows")],
    )


FAMILY = Family(name="internlm2", model_type="INTERNLM2_PUBLIC", internevo=internevo_table,
                marker=".attention.wqkv.", hf=(llama_table, official_hf_table),
                hf_architecture="InternLM2ForCausalLM")
