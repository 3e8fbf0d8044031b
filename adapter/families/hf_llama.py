"""transformers' ``LlamaForCausalLM`` names: what every family exports to (no remote code needed).

Separate ``q_proj``/``k_proj``/``v_proj`` (head-major rows, k/v with the kv heads), ``gate_proj``,
``up_proj``, ``down_proj``; rotate-half RoPE like InternEvo's default, so no row permutation is needed.
"""

from __future__ import annotations

from functools import lru_cache

from adapter.config.schema import ModelConfig
from adapter.weights.stored import Stored
from adapter.weights.table import Table

_L = "model.layers.{i}."


@lru_cache(maxsize=None)
def llama_table(model: ModelConfig) -> Table:
    return Table.of(
        model,
        embedding=[Stored("model.embed_tokens.weight", ("embedding",))],
        layer=[Stored(_L + f"self_attn.{p}_proj.weight", (f"{p}.weight",)) for p in "qkv"]
        + [Stored(_L + f"self_attn.{p}_proj.bias", (f"{p}.bias",)) for p in "qkv"]
        + [Stored(_L + "self_attn.o_proj.weight", ("o.weight",)),
           Stored(_L + "self_attn.o_proj.bias", ("o.bias",)),
           Stored(_L + "mlp.gate_proj.weight", ("gate",)),
           Stored(_L + "mlp.up_proj.weight", ("up",)),
           Stored(_L + "mlp.down_proj.weight", ("down",)),
           Stored(_L + "input_layernorm.weight", ("norm1.weight",)),
           Stored(_L + "post_attention_layernorm.weight", ("norm2.weight",))],
        final=[Stored("model.norm.weight", ("final_norm.weight",)), Stored("lm_head.weight", ("head",))],
    )
