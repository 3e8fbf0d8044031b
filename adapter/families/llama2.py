"""Llama 2 as InternEvo 0.5.2 trains it (``model_type="LLAMA2"``, ``internlm/model/modeling_llama.py``).

Grouped-query attention with *separate* ``wq``/``wk``/``wv`` (``GQA(enable_qkv_fusion=False)``, never a
fused ``wqkv``), biases on all four attention projections unless ``no_bias`` (InternEvo's default is
``no_bias=False``), none on the MLP, RMSNorm, untied embedding and output. In a tensor rank's file each of
``wq``/``wk``/``wv`` is a row slice (its own heads). The megatron-core model is InternLM2's; only the
checkpoint names differ. (InternEvo's own HF importer for LLAMA2 swaps ``w2``/``w3`` and maps no attention
biases; this follows the module code, checked against InternEvo's own logits.)
"""

from __future__ import annotations

from functools import lru_cache

from adapter.config.schema import ModelConfig
from adapter.families import Family
from adapter.families.hf_llama import llama_table
from adapter.weights.stored import Stored
from adapter.weights.table import Table

_L = "layers.{i}."


@lru_cache(maxsize=None)
def internevo_table(model: ModelConfig) -> Table:
    attention = []
    for p in "qkv":
        attention += [Stored(_L + f"attention.w{p}.weight", (f"{p}.weight",), "rows"),
                      Stored(_L + f"attention.w{p}.bias", (f"{p}.bias",), "rows")]
    return Table.of(
        model,
        embedding=[Stored("tok_embeddings.weight", ("embedding",), "columns")],
        layer=attention + [
            Stored(_L + "attention.wo.weight", ("o.weight",), "columns"),
            Stored(_L + "attention.wo.bias", ("o.bias",), "first"),
            Stored(_L + "attention_norm.weight", ("norm1.weight",)),
            Stored(_L + "attention_norm.bias", ("norm1.bias",)),
            Stored(_L + "ffn_norm.weight", ("norm2.weight",)),
            Stored(_L + "ffn_norm.bias", ("norm2.bias",)),
            Stored(_L + "feed_forward.w1.weight", ("gate",), "rows"),
            Stored(_L + "feed_forward.w2.weight", ("down",), "columns"),
            Stored(_L + "feed_forward.w3.weight", ("up",), "rows"),
        ],
        final=[Stored("norm.weight", ("final_norm.weight",)), Stored("norm.bias", ("final_norm.bias",)),
               Stored("output.weight", ("head",), "uneven_rows")],
    )


FAMILY = Family(name="llama2", model_type="LLAMA2", internevo=internevo_table, marker=".attention.wq.",
                hf=(llama_table,))
