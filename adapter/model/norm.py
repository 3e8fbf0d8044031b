"""InternEvo's normalisation layers, usable with megatron sequence parallelism."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig


class Norm(torch.nn.Module):
    """RMSNorm computed as InternEvo does (or LayerNorm when ``config.normalization == "LayerNorm"``).

    RMSNorm: ``x * rsqrt(mean(x²) + eps)`` in fp32, cast to the weight dtype, times the weight
    (InternEvo ``model/ops/norm.py``). With sequence parallelism each rank sees a slice of the sequence,
    so the weight gradients are partial sums: the weights are tagged ``sequence_parallel`` so that the
    trainer all-reduces them over the tensor group (megatron-core's own convention).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rms:
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(self.weight.dtype)
