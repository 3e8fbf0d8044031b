"""The packed-row attention runs on torch's fused SDPA kernels, never on its fp32 "math" fallback.

Without flash-attn, ``CoreAttention`` calls ``scaled_dot_product_attention`` once per packed piece. torch
takes its flash or memory-efficient kernels only for 4-D inputs; 3-D ones silently fall back to the math
kernel, which on an H200 computed attention in fp32 SIMT matmuls and cut training to a third of the speed
(BENCHMARKS.md, GPU section). Restricting SDPA to the fused kernels makes any fallback an error; the output is
checked against a plain causal softmax per piece so that the restricted path still computes attention.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

HEAD_DIM = 64
CU_SEQLENS = [0, 100, 101, 180, 256]
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
               not torch.cuda.is_available(), reason="needs a CUDA device")])]


@pytest.fixture
def without_flash_attn(monkeypatch):
    """The SDPA path of ``CoreAttention`` (flash-attn switched off), at tensor-parallel size 1."""
    from megatron.core import parallel_state

    from adapter.model import attention

    monkeypatch.setattr(attention, "flash_attn_varlen_func", None)
    monkeypatch.setattr(attention, "flash_attn_func", None)
    parallel_state.set_tensor_model_parallel_world_size(1)
    yield attention
    parallel_state.set_tensor_model_parallel_world_size(None)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax attention per piece, in fp64, written out (no SDPA)."""
    out = torch.empty_like(q, dtype=torch.float64)
    for start, end in zip(CU_SEQLENS[:-1], CU_SEQLENS[1:]):
        qs, ks, vs = (t[start:end].double().transpose(0, 1) for t in (q, k, v))  # [h, len, d]
        scores = qs @ ks.transpose(1, 2) * scale
        mask = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).tril()
        out[start:end] = (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vs).transpose(0, 1)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_packed_attention_uses_fused_sdpa_kernels(without_flash_attn, device):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from adapter.model.forward import packed_seq_params

    heads = 4
    config = TransformerConfig(num_layers=1, hidden_size=heads * HEAD_DIM, num_attention_heads=heads,
                               kv_channels=HEAD_DIM, attention_dropout=0.0)
    module = without_flash_attn.CoreAttention(config, 1, AttnMaskType.causal, "self")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(CU_SEQLENS[-1], heads, HEAD_DIM, generator=g).to(device, dtype).requires_grad_()
               for _ in range(3))
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    with sdpa_kernel(fused):  # the math kernel is not allowed: a fallback raises
        out = module(q, k, v, None, packed_seq_params=packed_seq_params(torch.tensor(CU_SEQLENS, device=device)))
        out.float().square().sum().backward()
    ref = _reference(q.detach(), k.detach(), v.detach(), module.scale).reshape(out.shape)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() <= tol
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
