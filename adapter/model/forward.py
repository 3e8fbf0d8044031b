"""Forward (and backward) of the model chunks over InternEvo micro-batches, through megatron-core's schedule.

One micro-batch is what InternEvo feeds its model per micro-step: either a packed row of
``micro_bsz * seq_len`` tokens with ``cu_seqlens`` (batch dimension 1), or ``micro_bsz`` unpacked rows.
megatron-core's ``get_forward_backward_func`` picks the schedule (no pipeline, 1F1B, or interleaved when the
model has several chunks) and owns the micro-batch loop; it divides each micro-batch loss by the number of
micro-batches before backward, which is InternEvo's ``loss / gradient_accumulation``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig

IGNORE_INDEX = -100


@dataclass
class MicroBatch:
    """``input_ids``/``labels``: ``[b, s]`` (``labels`` may hold -100 = no loss); ``cu_seqlens``: the piece
    boundaries ``[0, …, s]`` of a packed row (then ``b == 1``), or ``None`` for plain causal rows."""

    input_ids: torch.Tensor
    labels: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None

    def to(self, device: torch.device | str) -> "MicroBatch":
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return MicroBatch(move(self.input_ids), move(self.labels), move(self.cu_seqlens))


def packed_seq_params(cu_seqlens: torch.Tensor) -> PackedSeqParams:
    """megatron-core's description of a packed row (its ``thd`` format)."""
    cu = cu_seqlens.to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def token_losses(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy per token from vocab-parallel logits ``[b, s, V/tp]``; 0 where the label is -100.

    Label smoothing follows torch's (and InternEvo's) definition, ``(1 - e) * nll + e * mean_i(-log p_i)``
    over the whole vocabulary; megatron-core's built-in smoothing spreads the mass over the other classes
    of the local vocabulary shard only, so it is computed here instead. megatron-core's kernel overwrites
    fp32 logits in place (it saves memory); callers that still need the logits must copy them first."""
    valid = labels != IGNORE_INDEX
    target = torch.where(valid, labels, torch.zeros_like(labels))
    if not label_smoothing:
        return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), target) * valid
    z = logits.float()
    group = parallel_state.get_tensor_model_parallel_group()
    z_max = z.detach().max(dim=-1, keepdim=True).values
    torch.distributed.all_reduce(z_max, op=torch.distributed.ReduceOp.MAX, group=group)
    sum_exp = tensor_parallel.reduce_from_tensor_model_parallel_region((z - z_max).exp().sum(dim=-1))
    mean_z = tensor_parallel.reduce_from_tensor_model_parallel_region(z.sum(dim=-1)) / (
        z.shape[-1] * parallel_state.get_tensor_model_parallel_world_size())
    smooth = z_max.squeeze(-1) + sum_exp.log() - mean_z  # mean over the vocabulary of -log p
    nll = tensor_parallel.vocab_parallel_cross_entropy(z.clone(), target)
    return ((1 - label_smoothing) * nll + label_smoothing * smooth) * valid


def forward_step(data_iterator: Iterator[MicroBatch], model: torch.nn.Module, *, label_smoothing: float = 0.0,
                 keep_logits: bool = False):
    """megatron-core forward-step function: run one chunk on the next micro-batch."""
    batch = next(data_iterator)
    params = packed_seq_params(batch.cu_seqlens) if batch.cu_seqlens is not None else None
    output = model(batch.input_ids, None, None, packed_seq_params=params)
    return output, partial(_loss, batch.labels, label_smoothing, keep_logits)


def _loss(labels: torch.Tensor, label_smoothing: float, keep_logits: bool, logits: torch.Tensor):
    """InternEvo's loss: mean token cross-entropy over the micro-batch's labelled tokens."""
    report: dict[str, Any] = {}
    if keep_logits:  # before the loss: megatron's vocab-parallel cross-entropy works in place on the logits
        report["logits"] = tensor_parallel.gather_from_tensor_model_parallel_region(logits).detach().clone()
    losses = token_losses(logits, labels, label_smoothing)
    count = (labels != IGNORE_INDEX).sum()
    loss = losses.sum() / count.clamp(min=1)
    # clone: the schedule divides the returned loss by the number of micro-batches in place
    report.update(loss=loss.detach().clone(), tokens=count.detach())
    return loss, report


def run_microbatches(chunks: list[torch.nn.Module], batches: list[MicroBatch], config: TransformerConfig, *,
                     forward_only: bool, keep_logits: bool = False, label_smoothing: float = 0.0) -> list[dict]:
    """Forward (and backward unless ``forward_only``) over ``batches``; returns per-micro-batch reports on the
    last pipeline stage (``loss``, ``tokens``, and ``logits`` gathered over the tensor group if asked), and
    ``[]`` elsewhere. Gradients accumulate into the parameters' ``.grad``."""
    shape = batches[0].input_ids.shape
    step = partial(forward_step, label_smoothing=label_smoothing, keep_logits=keep_logits)
    iterators = [iter(batches) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(batches),
        seq_length=shape[1],
        micro_batch_size=shape[0],
        forward_only=forward_only,
    )
