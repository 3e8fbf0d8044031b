"""InternLM1 (InternEvo ``model_type="INTERNLM"``, 7B/20B/30B): multi-head attention with biases on the
fused ``Wqkv`` and on ``out_proj``, none on the MLP.

InternEvo's ``Wqkv`` is ``[Q; K; V]`` (each head-major); a tensor rank's file holds ``[Q_t; K_t; V_t]``, its
own heads. In a file, ``out_proj`` comes before ``Wqkv`` (a state-dict hook renames ``wqkv`` by popping and
re-inserting it). Exports to HF ``LlamaForCausalLM`` with ``attention_bias=True``.
"""

from __future__ import annotations

from functools import lru_cache

from adapter.config.schema import ModelConfig
from adapter.families import Family
from adapter.families.hf_llama import llama_table
from adapter.weights.stored import Stored
from adapter.weights.table import Table

_L = "blocks.{i}."


@lru_cache(maxsize=None)
def internevo_table(model: ModelConfig) -> Table:
    return Table.of(
        model,
        embedding=[Stored("embedding.weight", ("embedding",), "columns")],
        layer=[
            Stored(_L + "mixer.out_proj.weight", ("o.weight",), "columns"),
            Stored(_L + "mixer.out_proj.bias", ("o.bias",), "first"),
            Stored(_L + "mixer.Wqkv.weight", ("q.weight", "k.weight", "v.weight"), "rows"),
            Stored(_L + "mixer.Wqkv.bias", ("q.bias", "k.bias", "v.bias"), "rows"),
            Stored(_L + "norm1.weight", ("norm1.weight",)),
            Stored(_L + "norm1.bias", ("norm1.bias",)),
            Stored(_L + "norm2.weight", ("norm2.weight",)),
            Stored(_L + "norm2.bias", ("norm2.bias",)),
            Stored(_L + "mlp.w1.weight", ("gate",), "rows"),
            Stored(_L + "mlp.w2.weight", ("down",), "columns"),
            Stored(_L + "mlp.w3.weight", ("up",), "rows"),
        ],
        final=[Stored("norm.weight", ("final_norm.weight",)), Stored("norm.bias", ("final_norm.bias",)),
               Stored("head.weight", ("head",), "uneven_rows")],
    )


FAMILY = Family(name="internlm1", model_type="INTERNLM", internevo=internevo_table, marker=".mixer.Wqkv.",
                hf=(llama_table,), hf_architecture="InternLMForCausalLM", gqa=False)
