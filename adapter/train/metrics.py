"""Throughput accounting: model FLOPs per token, TFLOPS and MFU.

Model FLOPs count the matrix multiplications of one forward pass and multiply by 3 (forward + backward,
whose two matmuls per weight cost twice the forward). Activation recompute is *not* counted: this is
MFU, not hardware FLOPs utilisation. Per token and layer, with hidden ``h``, kv heads × head dim ``k``,
MLP width ``f`` and attended length ``a``::

    2·h·(h + 2k)   qkv projection
    2·h·h          output projection
    2·3·h·f        SwiGLU MLP (three matrices)
    2·2·a·h        attention scores and weighted sum (q·kᵀ, p·v)

plus ``2·h·V`` for the output layer. For causal attention over packed pieces of lengths ``l_i`` the mean
attended length is ``a = Σ l_i (l_i + 1) / 2 / Σ l_i``.

MFU = model FLOPs per second / (peak FLOPs per device × devices). The peak must be given (e.g. 989e12
for an H100 in dense bf16); without it MFU is not reported.
"""

from __future__ import annotations

from adapter.config.schema import ModelConfig


def flops_per_token(model: ModelConfig, attended: float) -> float:
    """Training FLOPs (forward + backward) per token."""
    h, f, v = model.hidden_size, model.ffn_hidden_size, model.vocab_size
    k = model.num_kv_attention_heads * model.head_dim
    per_layer = 2 * h * (h + 2 * k) + 2 * h * h + 6 * h * f + 4 * attended * h
    return 3 * (model.num_layers * per_layer + 2 * h * v)


def mean_attended_length(piece_lengths: list[int]) -> float:
    """Mean number of keys a query attends to under causal attention within each piece."""
    total = sum(piece_lengths)
    return sum(n * (n + 1) / 2 for n in piece_lengths) / total if total else 0.0
