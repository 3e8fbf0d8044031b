"""Core attention that never attends across packed-sequence boundaries.

InternEvo trains on packed rows: several documents concatenated into ``micro_bsz * seq_len`` tokens, with
``cu_seqlens`` marking where each piece starts. megatron-core passes such batches in its ``thd`` format
(``PackedSeqParams``); its local ``DotProductAttention`` refuses them, so this module takes its place in the
layer spec. It uses flash-attn's varlen kernel when installed and the tensors are half precision on CUDA,
and torch's ``scaled_dot_product_attention`` (one causal call per piece) otherwise. Unpacked batches
(``sbhd``) are plain causal attention.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

try:  # optional: pip install internlm-adapter[flash]
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = flash_attn_varlen_func = None


class CoreAttention(MegatronModule):
    """softmax(q kᵀ · scale) v per head, causal. Query head ``h`` reads kv head ``h // (heads / groups)``."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        tp = pg_collection.tp.size() if pg_collection is not None else \
            parallel_state.get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type=None, attention_bias=None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> torch.Tensor:
        dropout = self.dropout if self.training else 0.0
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._varlen(query, key, value, packed_seq_params, dropout)  # [t, h*d]
        # sbhd: [s, b, heads, d]
        s, b = query.shape[:2]
        if self._use_flash(query):
            out = flash_attn_func(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), dropout,
                                  softmax_scale=self.scale, causal=True)  # [b, s, h, d]
            return out.transpose(0, 1).reshape(s, b, -1)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        k, v = self._expand_groups(k, 1), self._expand_groups(v, 1)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=self.scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _use_flash(self, query: torch.Tensor) -> bool:
        return flash_attn_func is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)

    def _expand_groups(self, kv: torch.Tensor, head_dim: int) -> torch.Tensor:
        groups = kv.shape[head_dim]
        return kv if groups == self.heads else kv.repeat_interleave(self.heads // groups, dim=head_dim)

    def _varlen(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, params: PackedSeqParams,
                dropout: float) -> torch.Tensor:
        # query [t, heads, d], key/value [t, groups, d]
        cu = params.cu_seqlens_q
        if self._use_flash(query):
            out = flash_attn_varlen_func(query, key, value, cu, cu, params.max_seqlen_q, params.max_seqlen_q,
                                         dropout, softmax_scale=self.scale, causal=True)
            return out.reshape(out.shape[0], -1)
        k, v = self._expand_groups(key, 1), self._expand_groups(value, 1)
        out = torch.empty_like(query)
        bounds = cu.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                # 4-D [1, h, len, d]: torch's flash and memory-efficient kernels take only 4-D inputs; with 3-D
                # ones it falls back to the math kernel, in fp32 on the GPU (a third of the speed on an H200)
                piece = F.scaled_dot_product_attention(
                    *(t[start:end].transpose(0, 1).unsqueeze(0) for t in (query, k, v)),
                    dropout_p=dropout, is_causal=True, scale=self.scale)
                out[start:end] = piece[0].transpose(0, 1)
        return out.reshape(out.shape[0], -1)
