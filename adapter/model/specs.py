"""The InternLM decoder layer as a megatron-core ``ModuleSpec``.

Same structure as megatron-core's local GPT spec (pre-norm, fused qkv, SwiGLU MLP), with three slots
swapped:

* ``input_layernorm``/``pre_mlp_layernorm`` and the final norm: ``Norm`` (InternEvo's fp32 RMSNorm,
  sequence-parallel aware; megatron's ``WrappedTorchNorm`` refuses sequence parallelism);
* ``core_attention``: ``CoreAttention`` (packed sequences, flash-attn or torch SDPA);
* ``linear_proj``: ``BiasedRowParallelLinear`` when the family has an output-projection bias.
  InternLM1 has biases on qkv and on the attention output but none on the MLP; megatron-core's
  ``add_bias_linear`` switches the output projection and the MLP together, so the config keeps it off and
  this slot adds the one bias.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from adapter.model.attention import CoreAttention
from adapter.model.norm import Norm


class BiasedRowParallelLinear(RowParallelLinear):
    """A ``RowParallelLinear`` that always has a bias, whatever ``config.add_bias_linear`` says.

    The bias is replicated on every tensor rank and added once, after the reduction.
    """

    def __init__(self, *args, bias: bool = True, **kwargs):
        del bias
        super().__init__(*args, bias=True, **kwargs)


def layer_spec(out_proj_bias: bool) -> ModuleSpec:
    """The decoder layer for either family (qkv bias comes from ``config.add_qkv_bias``)."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=CoreAttention,
                    linear_proj=BiasedRowParallelLinear if out_proj_bias else RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                               linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(out_proj_bias: bool, num_layers: int) -> TransformerBlockSubmodules:
    """``num_layers`` decoder layers plus the final norm (used only on the last pipeline stage)."""
    return TransformerBlockSubmodules(layer_specs=[layer_spec(out_proj_bias)] * num_layers, layer_norm=Norm)
