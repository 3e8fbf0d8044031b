"""Build the model chunks of one pipeline rank: one ``GPTModel`` per virtual pipeline stage."""

from __future__ import annotations

import dataclasses

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import get_num_layers_to_build

from adapter.config.to_mcore import ModelOptions
from adapter.model.specs import block_spec


def build_model_chunks(config: TransformerConfig, options: ModelOptions) -> list[GPTModel]:
    """The chunks this rank holds, in virtual-stage order. Needs ``parallel_state`` initialised.

    Layers per chunk follow ``config.pipeline_model_parallel_layout`` (InternEvo's partition, set by
    ``adapter.config.to_mcore``); the embedding lives in the first chunk of the first stage and the final
    norm and output layer in the last chunk of the last stage.
    """
    vpp = config.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
        chunk = GPTModel(
            config=chunk_config(config, options.recompute_ratio, num_layers),
            transformer_layer_spec=block_spec(options.out_proj_bias, num_layers),
            vocab_size=options.vocab_size,
            max_sequence_length=options.max_sequence_length,
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=options.share_embeddings_and_output_weights,
            position_embedding_type=options.position_embedding_type,
            rotary_percent=options.rotary_percent,
            rotary_base=options.rotary_base,
            vp_stage=vp_stage,
        )
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    return chunks


def chunk_config(config: TransformerConfig, ratio: float, num_layers: int) -> TransformerConfig:
    """``config`` with InternEvo's recompute rule for a chunk of ``num_layers`` layers.

    InternEvo recomputes the first ``int(num_layers * ratio)`` layers of each chunk, so with an uneven
    pipeline split the count differs between chunks; megatron-core's ``block`` method recomputes the first
    ``recompute_num_layers`` layers of its block, so each chunk gets its own copy of the config.
    """
    if not 0 < ratio < 1:
        return config
    count = int(num_layers * ratio)
    if count == 0:
        return dataclasses.replace(config, recompute_granularity=None, recompute_method=None,
                                   recompute_num_layers=None)
    return dataclasses.replace(config, recompute_granularity="full", recompute_method="block",
                               recompute_num_layers=count)
