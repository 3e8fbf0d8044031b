"""Judges: a field's fidelity status refined by the value actually given (torch-free).

``fields.FIELDS`` gives each InternEvo key a status; where the truth depends on the value (``adam_beta2_c=0`` is
exact, ``0.8`` is not) or on other fields (the loss scaler only matters in fp16), the row names one of these.
Each takes the normalised config and the value as written, and returns ``(status, note)``, or ``None`` to keep
the row's own status and note.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:
    from adapter.config.schema import InternLMConfig

Status = Literal["exact", "approximate", "unsupported"]
Judge = Callable[["InternLMConfig", Any], "tuple[Status, str] | None"]


def zero1(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    size = cfg.parallel.zero1_size
    if size == 1:
        return "approximate", ("zero1=1 means plain data parallelism in InternEvo; DeepSpeed stage 1 still "
                               "partitions optimizer states over all data-parallel ranks (same numbers, less memory)")
    if size <= 0:
        return "exact", "ZeRO-1 over the whole data-parallel group, as DeepSpeed stage 1 does"
    return "approximate", (
        f"zero1={size} partitions optimizer states inside groups of {size} data-parallel ranks; DeepSpeed "
        "stage 1 partitions over all data-parallel ranks. Same numbers, but communication scales differently: "
        "InternEvo measured 88.9% scaling with zero1=8 vs 55.9% with all-rank ZeRO-1 on 1024 GPUs "
        "(InternLM-7B). Memory per rank is lower with DeepSpeed.")


def beta2_c(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    b2 = cfg.beta2_scheduler
    if b2.c <= 0:
        return "exact", "beta2_scheduler.c <= 0 keeps beta2 constant, which is what AdamW does"
    if b2.init_beta2 >= 1:
        return "exact", "beta2 = max(init_beta2, ...) stays at init_beta2"
    first = math.floor((1 - b2.init_beta2) ** (-1 / b2.c)) + 1  # first step where 1 - t**-c > init_beta2
    return "unsupported", (f"InternEvo raises beta2 to max(init_beta2, 1 - t**-c) (c={b2.c:g}), above "
                           f"{b2.init_beta2:g} from step {first} on; DeepSpeed's AdamW keeps beta2 constant (the "
                           "adapter's training entry point sets it each step as InternEvo's Beta2Scheduler does)")


def flash_packing(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if cfg.model.use_flash_attn == cfg.data.use_packed_dataset:
        return None
    return "exact", (f"InternEvo 0.5.2 refuses use_flash_attn={cfg.model.use_flash_attn} with "
                     f"data.use_packed_dataset={cfg.data.use_packed_dataset} on GPU (\"use_packed_dataset should be "
                     "set same value as use_flash_attn\", initialize/launch.py:385-387); here either kernel runs "
                     "packed rows, each attending within its cu_seqlens segments, so this config trains here but "
                     "not in InternEvo")


def growth(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if cfg.model.dtype != "fp16":
        return "exact", "only used by the fp16 loss scaler (InternEvo also scales bf16 losses, a numerical no-op)"
    gs = cfg.grad_scaler
    if gs.growth_factor == 2.0 and gs.backoff_factor == 0.5:
        return "approximate", ("DeepSpeed's fixed factor 2 matches; its growth fires one step later than "
                               "InternEvo's growth_interval count and it raises at min_scale instead of clamping")
    return "unsupported", (f"DeepSpeed's dynamic loss scaler always grows by 2 and backs off by 1/2; "
                           f"growth_factor={gs.growth_factor:g}, backoff_factor={gs.backoff_factor:g} are lost")


def clip(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    zo = cfg.zero_optimizer
    if cfg.model.dtype != "fp32":
        return "exact", ("clips the global norm over all parameters to clip_grad_norm, as InternEvo does in "
                         f"{cfg.model.dtype} (every parameter is in one group, so its per-group clipping is the same)")
    if zo.clip_in_fp32:
        return "approximate", ("adapter.clip_grad_in_fp32=True clips this fp32 run; InternEvo 0.5.2 does not clip "
                               "in fp32 (HybridZeroOptimizer._step clips only when model.dtype is not float32)")
    return "exact", ("InternEvo 0.5.2 does not clip in fp32 (HybridZeroOptimizer._step clips only when model.dtype "
                     "is not float32; torch.tf32 counts as float32): the norm is computed and reported, AdamW gets "
                     "the unclipped gradient, and so here (ds: gradient_clipping = 0). Set "
                     "adapter = dict(clip_grad_in_fp32=True) to clip anyway")


def clip_option(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if value and cfg.model.dtype == "fp32":
        return "approximate", "clips this fp32 run to clip_grad_norm, which InternEvo 0.5.2 does not"
    return "exact", "no effect: InternEvo's clipping rule applies" if not value else \
        f"no effect in {cfg.model.dtype}, where InternEvo clips anyway"


def max_scale(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if cfg.model.dtype != "fp16":
        return "exact", "only used by the fp16 loss scaler"
    return "unsupported", ("DeepSpeed's loss scaler has no upper bound: after enough overflow-free windows the "
                           "scale can exceed max_scale (harmless unless it overflows, which then backs off)")


def fp16_only(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if cfg.model.dtype != "fp16":
        return "exact", "unused: loss scaling only matters for fp16 (InternEvo's bf16 scaling is a no-op)"
    return None


def initial_scale(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if cfg.model.dtype != "fp16":
        return "exact", "unused: loss scaling only matters for fp16 (InternEvo's bf16 scaling is a no-op)"
    power = math.log2(cfg.grad_scaler.initial_scale) if cfg.grad_scaler.initial_scale > 0 else 0.5
    if power.is_integer():
        return None
    return "approximate", f"DeepSpeed takes a power of two: 2**{round(power)} instead of {cfg.grad_scaler.initial_scale:g}"


def lr_schedule(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    return "approximate", "DeepSpeed's WarmupCosineLR differs from InternEvo's schedule: see 'LR schedule' below"


def rampup(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if cfg.data.rampup_batch_size is None:
        return "exact", "disabled"
    return None


def checkpoint(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    ratio = cfg.model.checkpoint
    if ratio in (0.0, 1.0):
        return None
    from adapter.runtime.layout import partition_uniform

    sizes = {e - s for stage in partition_uniform(cfg.model.num_layers, cfg.parallel.pipeline_size,
                                                  cfg.model.num_chunks) for s, e in stage}
    if len(sizes) == 1:
        return None
    return "exact", ("the pipeline split is uneven, so InternEvo recomputes a different number of layers per "
                     "chunk; the model builder gives each chunk its own count (transformer_config.yaml and "
                     "Megatron-LM's --recompute-num-layers hold one number, the first chunk's)")


def tensor_mode(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    mode = cfg.parallel.tensor_mode
    if mode == "isp":
        return "unsupported", ("isp (InternEvo's all-to-all sequence parallelism with weight parallelism) has no "
                               "megatron-core equivalent; use 'msp'")
    if mode == "fsp":
        return "approximate", ("fsp becomes megatron sequence parallelism (= msp): same numbers, but the column "
                               "linears keep the all-gathered input as activation, using more memory")
    if mode == "msp" and cfg.parallel.tensor_size == 1:
        return "exact", "sequence parallelism with tensor size 1 is a no-op in both frameworks"
    return None


def legacy_sequence_parallel(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if value is not True or "parallel.tensor.mode" in cfg.given:
        return None
    if cfg.parallel.tensor_size == 1:
        return "exact", "the 2023 flag at tensor size 1: no sequence parallelism either way"
    return "approximate", (
        "the 2023 flag without a tensor mode: InternEvo 0.5.2's check sets the mode to 'mtp' "
        "(initialize/launch.py:358-361), so it runs without sequence parallelism (is_using_sequence_parallel() "
        "is False) while its schedulers still read the flag; the adapter takes it to mean mode 'msp', Megatron "
        "sequence parallelism: the same numbers, less activation memory")


def fsdp(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if cfg.parallel.fsdp:
        return "approximate", ("FSDP shards parameters and gradients too; DeepSpeed ZeRO stage 1 shards only "
                               "optimizer states, so each rank holds full parameters and gradients")
    return None


def dtype(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if cfg.model.dtype == "bf16":
        return "exact", "bf16 params with fp32 master weights; gradients accumulate in bf16 as InternEvo's do"
    if cfg.model.dtype == "fp16":
        return "exact", "fp16 params with fp32 master weights and dynamic loss scaling"
    if cfg.model.tf32:
        return "exact", "fp32 with TF32 matmuls enabled by the training entry point"
    return None


def drop(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if value in (0, 0.0):
        return None
    return "approximate", "dropout is applied at megatron-core's positions, with its own RNG streams"


def must_be(expected: Any, message: str) -> Judge:
    def judge(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
        return None if value == expected else ("unsupported", message)

    return judge


def off_is_exact(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    """Switched-off features lose nothing."""
    if value in (None, False, "", 0, 1) and not isinstance(value, float):
        return "exact", "disabled"
    return None


def weight(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if cfg.parallel.weight_size == 1:
        return "exact", "weight parallel size 1: no weight parallelism"
    return None


def overlap_grad(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if not cfg.zero_optimizer.overlap_sync_grad:
        return "exact", "no overlap, as configured"
    return "approximate", ("gradients are reduced once, after the schedule's last backward pass, not overlapped "
                           "with it: megatron-core's schedule runs every micro-batch inside one DeepSpeed step, "
                           "and DeepSpeed's overlap hooks would reduce after the first micro-batch "
                           "(overlap_comm = false)")


def overlap_param(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if not value:
        return "exact", "no overlap, as configured"
    return "approximate", ("DeepSpeed stage 1 all-gathers updated parameters after the step (no asynchronous "
                           "broadcast overlapped with the next forward)")


def async_upload(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if not cfg.given.get("ckpt.async_upload"):
        return "exact", "synchronous saving, as configured"
    if not cfg.ckpt.async_upload:
        return "exact", "ignored for non-object-store folders, as InternEvo does (it saves synchronously)"
    return "exact", ("uploaded from a local staging folder in a background thread; the completion marker goes "
                     "up only after every file, as in InternEvo")
