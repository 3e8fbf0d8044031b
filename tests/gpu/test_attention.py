"""flash-attn against torch's SDPA inside the adapter's ``CoreAttention``, on packed rows, in bf16 on CUDA.

Both paths run in the module itself: flash-attn's varlen kernel (taken for half precision on CUDA when it is
installed) and, with flash-attn switched off, the per-piece ``scaled_dot_product_attention`` calls. The
reference is the SDPA path in fp32 on the same inputs.

Tolerance (flash-attn's own test rule): flash-attn's largest absolute error against the fp32 reference is at
most twice that of torch's bf16 SDPA for the output and three times for the gradients of q, k and v, plus
1e-4. A negative control shows the check would see attention leaking across a piece boundary.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

HEAD_DIM = 128
#: a packed row of 4096 tokens: a long piece, a one-token piece, and two more
CU_SEQLENS = [0, 1500, 1501, 2900, 4096]


@pytest.fixture
def tensor_parallel_size_one():
    """``CoreAttention`` reads the tensor-parallel size from megatron's parallel state; no group is needed."""
    from megatron.core import parallel_state

    parallel_state.set_tensor_model_parallel_world_size(1)
    yield
    parallel_state.set_tensor_model_parallel_world_size(None)


def _core_attention(heads: int, groups: int):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from adapter.model import attention

    config = TransformerConfig(num_layers=1, hidden_size=heads * HEAD_DIM, num_attention_heads=heads,
                               num_query_groups=groups, kv_channels=HEAD_DIM, attention_dropout=0.0)
    return attention.CoreAttention(config, 1, AttnMaskType.causal, "self")


def _run(module, q, k, v, dout, packed: bool) -> tuple[torch.Tensor, ...]:
    """Output and q/k/v gradients of ``module`` on leaf copies of q, k, v (``packed``: one thd row, else sbhd)."""
    from adapter.model.forward import packed_seq_params

    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if packed:
        out = module(q, k, v, None, packed_seq_params=packed_seq_params(torch.tensor(CU_SEQLENS, device=q.device)))
    else:  # [t, h, d] → [s, b=1, h, d]
        out = module(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), None).squeeze(1)
    out.backward(dout.reshape(out.shape))
    return out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()


@pytest.mark.parametrize("packed", [True, False], ids=["varlen", "unpacked"])
@pytest.mark.parametrize("heads, groups", [(32, 32), (32, 8)], ids=["mha", "gqa"])
def test_flash_attn_matches_sdpa(tensor_parallel_size_one, monkeypatch, heads, groups, packed):
    from adapter.model import attention

    if attention.flash_attn_varlen_func is None:
        pytest.skip("flash-attn is not installed: the adapter uses torch SDPA (bench/gpu.sh installs the wheel "
                    "when one matches this torch and CUDA)")
    module = _core_attention(heads, groups).eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = CU_SEQLENS[-1]
    q = torch.randn(tokens, heads, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(tokens, groups, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16)
            for _ in range(2))
    dout = torch.randn(tokens, heads * HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16)

    flash = _run(module, q, k, v, dout, packed)
    reference = _run(module, q.float(), k.float(), v.float(), dout.float(), packed)  # fp32: SDPA
    monkeypatch.setattr(attention, "flash_attn_varlen_func", None)
    monkeypatch.setattr(attention, "flash_attn_func", None)
    sdpa = _run(module, q, k, v, dout, packed)

    for name, got, torch_bf16, ref, factor in zip(("out", "dq", "dk", "dv"), flash, sdpa, reference, (2, 3, 3, 3)):
        flash_error = (got - ref).abs().max().item()
        sdpa_error = (torch_bf16 - ref).abs().max().item()
        assert flash_error <= factor * sdpa_error + 1e-4, (name, flash_error, sdpa_error)
    if packed:  # negative control: attention over the whole row, not cut at the pieces, is far off
        leaked = _run(module, q.float(), k.float(), v.float(), dout.float(), packed=False)[0]
        start = CU_SEQLENS[2]
        leak = (leaked[start:] - reference[0][start:]).abs().max().item()
        assert leak > 10 * (flash[0] - reference[0]).abs().max().item()
