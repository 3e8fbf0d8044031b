"""InternEvo config → DeepSpeed ZeRO stage-1 config dict (torch-free).

The shape of the batch keys follows how the training entry point drives DeepSpeed: megatron-core's
pipeline schedule owns the micro-batches, so DeepSpeed sees one step-sized "micro-batch" per optimizer
step (``gradient_accumulation_steps = 1``; with more, DeepSpeed silently skips steps, see
``CPU_NOTES.md`` P6). Batch sizes count sequences of ``seq_len`` tokens, as Megatron does; InternEvo packs
``micro_bsz`` of them into one row of ``micro_bsz * seq_len`` tokens.
"""

from __future__ import annotations

import math
from typing import Any

from adapter.config.schema import InternLMConfig
from adapter.runtime.layout import ParallelLayout


def deepspeed_config(cfg: InternLMConfig, layout: ParallelLayout) -> dict[str, Any]:
    """The DeepSpeed JSON for ``cfg``. ``train_batch_size`` is present only when ``layout.dp`` is known."""
    d, gs, zo = cfg.data, cfg.grad_scaler, cfg.zero_optimizer
    per_rank = d.micro_num * d.micro_bsz
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": per_rank,
        "gradient_accumulation_steps": 1,
    }
    if layout.dp is not None:
        ds["train_batch_size"] = per_rank * layout.dp
    ds["gradient_clipping"] = cfg.applied_clip_grad_norm  # InternEvo 0.5.2 clips nothing in fp32
    ds["zero_optimization"] = {
        "stage": 1,
        # InternEvo's reduce_bucket_size counts elements, like DeepSpeed's bucket sizes
        "reduce_bucket_size": zo.reduce_bucket_size,
        "allgather_bucket_size": zo.reduce_bucket_size,
        # never overlapped: DeepSpeed's overlap hooks fire on every backward pass, and megatron-core's schedule
        # runs all micro-batches inside one DeepSpeed step (the fidelity report says so for overlap_sync_grad)
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_scatter": True,
    }
    if cfg.model.dtype == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # dynamic
            "initial_scale_power": max(0, round(math.log2(gs.initial_scale))) if gs.initial_scale > 0 else 0,
            "loss_scale_window": gs.growth_interval,
            "hysteresis": gs.hysteresis,
            # InternEvo resets its hysteresis counter only when the scale grows, i.e. not consecutive
            "consecutive_hysteresis": False,
            "min_loss_scale": gs.min_scale,
        }
    elif cfg.model.dtype == "bf16":
        ds["bf16"] = {"enabled": True}
    ds["optimizer"] = {
        "type": "AdamW",
        "params": {
            "lr": cfg.adam.lr,
            "betas": [cfg.adam.beta1, cfg.beta2_scheduler.init_beta2],
            "eps": cfg.adam.eps,
            "weight_decay": cfg.adam.weight_decay,
        },
    }
    ds["scheduler"] = {"type": "WarmupCosineLR", "params": warmup_cosine_params(cfg)}
    ds["steps_per_print"] = max(d.total_steps, 1) * 10  # the training loop logs; keep DeepSpeed quiet
    ds["wall_clock_breakdown"] = False
    return ds


def warmup_cosine_params(cfg: InternLMConfig) -> dict[str, Any]:
    """DeepSpeed ``WarmupCosineLR`` parameters closest to InternEvo's warmup + cosine schedule.

    DeepSpeed's schedule is a ratio of the peak lr: the floor becomes ``eta_min / lr`` and the warmup
    ramps from 0 (InternEvo starts at ``lr / warmup_steps``). ``init_steps`` (lr held at 0) has no
    counterpart, so it is folded into the warmup. The fidelity report lists these differences.
    """
    lr = cfg.lr_scheduler
    warmup = lr.init_steps + lr.warmup_steps
    return {
        "total_num_steps": lr.total_steps,
        "warmup_num_steps": max(2, warmup),  # DeepSpeed enforces at least 2
        "warmup_type": "linear",
        "warmup_min_ratio": 0.0,
        "cos_min_ratio": lr.eta_min / cfg.adam.lr if cfg.adam.lr > 0 else 0.0,
        "last_batch_iteration": lr.last_epoch,
    }
