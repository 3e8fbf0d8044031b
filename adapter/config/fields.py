"""Every InternEvo config key we know, and where it goes: the fidelity table.

One row per dotted key. ``status`` is how faithfully DeepSpeed + megatron-core (as this adapter drives
them) reproduce InternEvo's behaviour for that key:

* ``exact``: same numbers (or the key has no effect in InternEvo 0.5.2 either),
* ``approximate``: close, and the note says how it differs,
* ``unsupported``: no equivalent, and the note says what the user loses.

A row's ``judge`` refines the status from the value actually given (``adam_beta2_c=0`` is exact,
``0.8`` is not). The table doubles as the list of known keys for the unknown-key check, so it must
stay torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:
    from adapter.config.schema import InternLMConfig

Status = Literal["exact", "approximate", "unsupported"]
Judge = Callable[["InternLMConfig", Any], "tuple[Status, str] | None"]


@dataclass(frozen=True)
class Rule:
    path: str
    status: Status
    target: str
    """Where the value lands: DeepSpeed JSON keys (``ds:``), TransformerConfig fields (``mcore:``),
    model-builder options (``model:``) or training-loop behaviour (``train:``)."""
    note: str = ""
    judge: Judge | None = None


def _zero1(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
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


def _beta2_c(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    b2 = cfg.beta2_scheduler
    if b2.c <= 0:
        return "exact", "beta2_scheduler.c <= 0 keeps beta2 constant, which is what AdamW does"
    if b2.init_beta2 >= 1:
        return "exact", "beta2 = max(init_beta2, ...) stays at init_beta2"
    first = math.floor((1 - b2.init_beta2) ** (-1 / b2.c)) + 1  # first step where 1 - t**-c > init_beta2
    return "unsupported", (f"InternEvo raises beta2 to max(init_beta2, 1 - t**-c) (c={b2.c:g}), above "
                           f"{b2.init_beta2:g} from step {first} on; DeepSpeed's AdamW keeps beta2 constant")


def _growth(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if cfg.model.dtype != "fp16":
        return "exact", "only used by the fp16 loss scaler (InternEvo also scales bf16 losses, a numerical no-op)"
    gs = cfg.grad_scaler
    if gs.growth_factor == 2.0 and gs.backoff_factor == 0.5:
        return "approximate", ("DeepSpeed's fixed factor 2 matches; its growth fires one step later than "
                               "InternEvo's growth_interval count and it raises at min_scale instead of clamping")
    return "unsupported", (f"DeepSpeed's dynamic loss scaler always grows by 2 and backs off by 1/2; "
                           f"growth_factor={gs.growth_factor:g}, backoff_factor={gs.backoff_factor:g} are lost")


def _clip(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
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


def _clip_option(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if value and cfg.model.dtype == "fp32":
        return "approximate", "clips this fp32 run to clip_grad_norm, which InternEvo 0.5.2 does not"
    return "exact", "no effect: InternEvo's clipping rule applies" if not value else \
        f"no effect in {cfg.model.dtype}, where InternEvo clips anyway"


def _max_scale(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if cfg.model.dtype != "fp16":
        return "exact", "only used by the fp16 loss scaler"
    return "unsupported", ("DeepSpeed's loss scaler has no upper bound: after enough overflow-free windows the "
                           "scale can exceed max_scale (harmless unless it overflows, which then backs off)")


def _fp16_only(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if cfg.model.dtype != "fp16":
        return "exact", "unused: loss scaling only matters for fp16 (InternEvo's bf16 scaling is a no-op)"
    return None


def _initial_scale(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if cfg.model.dtype != "fp16":
        return "exact", "unused: loss scaling only matters for fp16 (InternEvo's bf16 scaling is a no-op)"
    power = math.log2(cfg.grad_scaler.initial_scale) if cfg.grad_scaler.initial_scale > 0 else 0.5
    if power.is_integer():
        return None
    return "approximate", f"DeepSpeed takes a power of two: 2**{round(power)} instead of {cfg.grad_scaler.initial_scale:g}"


def _lr_schedule(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    return "approximate", "DeepSpeed's WarmupCosineLR differs from InternEvo's schedule: see 'LR schedule' below"


def _rampup(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if cfg.data.rampup_batch_size is None:
        return "exact", "disabled"
    return None


def _checkpoint(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
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


def _tensor_mode(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
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


def _fsdp(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if cfg.parallel.fsdp:
        return "approximate", ("FSDP shards parameters and gradients too; DeepSpeed ZeRO stage 1 shards only "
                               "optimizer states, so each rank holds full parameters and gradients")
    return None


def _dtype(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if cfg.model.dtype == "bf16":
        return "exact", "bf16 params with fp32 master weights; gradients accumulate in bf16 as InternEvo's do"
    if cfg.model.dtype == "fp16":
        return "exact", "fp16 params with fp32 master weights and dynamic loss scaling"
    if cfg.model.tf32:
        return "exact", "fp32 with TF32 matmuls enabled by the training entry point"
    return None


def _drop(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if value in (0, 0.0):
        return None
    return "approximate", "dropout is applied at megatron-core's positions, with its own RNG streams"


def _must_be(expected: Any, message: str) -> Judge:
    def judge(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
        return None if value == expected else ("unsupported", message)

    return judge


def _off_is_exact(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    """Switched-off features lose nothing."""
    if value in (None, False, "", 0, 1) and not isinstance(value, float):
        return "exact", "disabled"
    return None


def _weight(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if cfg.parallel.weight_size == 1:
        return "exact", "weight parallel size 1: no weight parallelism"
    return None


def _overlap_grad(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if not cfg.zero_optimizer.overlap_sync_grad:
        return "exact", "no overlap, as configured"
    return "approximate", ("gradients are reduced once, after the schedule's last backward pass, not overlapped "
                           "with it: megatron-core's schedule runs every micro-batch inside one DeepSpeed step, "
                           "and DeepSpeed's overlap hooks would reduce after the first micro-batch "
                           "(overlap_comm = false)")


def _overlap_param(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if not value:
        return "exact", "no overlap, as configured"
    return "approximate", ("DeepSpeed stage 1 all-gathers updated parameters after the step (no asynchronous "
                           "broadcast overlapped with the next forward)")


def _async_upload(cfg: "InternLMConfig", value: Any) -> tuple[Status, str] | None:
    if not cfg.given.get("ckpt.async_upload"):
        return "exact", "synchronous saving, as configured"
    if not cfg.ckpt.async_upload:
        return "exact", "ignored for non-object-store folders, as InternEvo does (it saves synchronously)"
    return "exact", ("uploaded from a local staging folder in a background thread; the completion marker goes "
                     "up only after every file, as in InternEvo")


_CKPT_NOTE = "read by the training entry point's checkpoint manager, not by DeepSpeed or megatron-core"
_DATA_NOTE = "read by the training entry point's InternEvo-compatible data pipeline"

RULES: tuple[Rule, ...] = (
    # top level
    Rule("JOB_NAME", "exact", "train: run name in logs and TensorBoard"),
    Rule("model_type", "exact", "model: family (INTERNLM → InternLM1 spec, INTERNLM2_PUBLIC → InternLM2 spec)"),
    Rule("DO_ALERT", "unsupported", "-", "Feishu alerting is not part of this adapter", _off_is_exact),
    Rule("cudnn_deterministic", "exact", "train: torch.backends.cudnn.deterministic"),
    Rule("cudnn_benchmark", "exact", "train: torch.backends.cudnn.benchmark"),
    Rule("use_fp32_norm", "exact", "mcore: RMSNorm math is fp32 either way", "",
         _must_be(False, "norm weights are stored in the model dtype, not kept in fp32")),
    Rule("enable_tb", "exact", "train: TensorBoard writer on the last pipeline stage"),
    Rule("tensorboard_folder", "exact", "train: TensorBoard log folder"),
    Rule("resume_tb_folder", "unsupported", "-", "TensorBoard logs are not copied from an earlier run", _off_is_exact),
    Rule("alert_address", "unsupported", "-", "alerting is not part of this adapter", _off_is_exact),
    Rule("metric_dtype", "unsupported", "-", "metrics are computed in fp32 always"),
    Rule("monitor", "unsupported", "-", "Feishu alerts and light-monitor heartbeats are not part of this adapter", _off_is_exact),
    Rule("gradient_handler", "exact", "-", "DeepSpeed ZeRO-1 reduces gradients itself"),
    Rule("only_load_lr", "unsupported", "-", "resuming only the learning rate is not supported", _off_is_exact),
    Rule("output_tf32", "unsupported", "-", "not read", _off_is_exact),
    Rule("moe", "unsupported", "-", "mixture-of-experts models are not supported", _off_is_exact),
    # model
    Rule("model.num_layers", "exact", "mcore: num_layers"),
    Rule("model.hidden_size", "exact", "mcore: hidden_size"),
    Rule("model.num_attention_heads", "exact", "mcore: num_attention_heads"),
    Rule("model.num_kv_attention_heads", "exact", "mcore: num_query_groups"),
    Rule("model.vocab_size", "exact", "model: vocab_size (no padding, as InternEvo)"),
    Rule("model.mlp_ratio", "exact", "mcore: ffn_hidden_size = 256*ceil(int(hidden*mlp_ratio)/256)"),
    Rule("model.multiple_of", "exact", "mcore: ffn_hidden_size rounding"),
    Rule("model.norm_type", "exact", "mcore: normalization (RMSNorm, or LayerNorm for any other value)"),
    Rule("model.layer_norm_epsilon", "exact", "mcore: layernorm_epsilon"),
    Rule("model.dtype", "exact", "ds: bf16/fp16 sections; mcore: params_dtype, pipeline_dtype, bf16/fp16", judge=_dtype),
    Rule("model.checkpoint", "exact",
         "mcore: recompute_granularity='full', recompute_method='block', recompute_num_layers=int(local*ratio)",
         judge=_checkpoint),
    Rule("model.num_chunks", "exact", "mcore: virtual_pipeline_model_parallel_size + pipeline_model_parallel_layout"),
    Rule("model.use_flash_attn", "exact",
         "model: flash-attn varlen core attention on CUDA when installed, torch SDPA otherwise (both honour cu_seqlens)"),
    Rule("model.rope_base", "exact", "model: rotary_base"),
    Rule("model.qk_interleaved", "exact", "mcore: rotary_interleaved"),
    Rule("model.adapt_hf", "exact", "mcore: rotary_interleaved = not adapt_hf"),
    Rule("model.no_bias", "exact", "mcore: add_qkv_bias; model: output-projection bias (no MLP bias either way)"),
    Rule("model.embed_grad_scale", "exact", "-", "1 leaves the embedding gradient unscaled, as here",
         _must_be(1.0, "InternEvo scales the embedding gradient by embed_grad_scale; it is not applied here")),
    Rule("model.parallel_output", "exact", "model: logits stay vocab-parallel for the parallel cross-entropy"),
    Rule("model.embed_split_hidden", "exact", "-", "InternEvo 0.5.2 pops and ignores it too"),
    Rule("model.apply_post_layer_norm", "exact", "-", "InternEvo 0.5.2 pops and ignores it (always pre-norm)"),
    Rule("model.norm_head", "exact", "-", "computed and then unused in InternEvo 0.5.2"),
    Rule("model.use_dynamic_ntk_rope", "exact", "-", "",
         _must_be(False, "dynamic NTK rotary scaling is not implemented; plain RoPE is used")),
    Rule("model.max_position_embeddings", "exact", "-", "only used by dynamic NTK rope in InternEvo"),
    Rule("model.drop_rate", "exact", "mcore: hidden_dropout", judge=_drop),
    Rule("model.attn_drop_rate", "exact", "mcore: attention_dropout", judge=_drop),
    Rule("model.residual_in_fp32", "exact", "mcore: fp32_residual_connection"),
    Rule("model.is_reward", "exact", "-", "", _must_be(False, "reward-model heads are not supported")),
    Rule("model.dropout_selective_checkpoint", "exact", "-", "a memory optimisation with no numerical effect at dropout 0"),
    Rule("model.use_scaled_init", "approximate", "mcore: output_layer_init_method (scaled normal)",
         "initialisation follows megatron-core's normal/scaled-normal scheme, not InternEvo's exact draws"),
    Rule("model.use_swiglu", "exact", "mcore: gated_linear_unit + silu", "",
         _must_be(True, "only the SwiGLU MLP is supported")),
    Rule("model.deepnorm", "exact", "-", "", _must_be(False, "DeepNorm residual scaling is not supported")),
    Rule("model.mlp_layer_fusion", "exact", "mcore: linear_fc1 is always fused [w1; w3]",
         "checkpoints keep w1/w3 split either way, as InternEvo's save hooks do"),
    Rule("model.num_experts", "exact", "-", "", _must_be(1, "mixture-of-experts models are not supported")),
    Rule("model.moe_type", "exact", "-", "unused without experts"),
    Rule("model.moe_use_residual", "exact", "-", "unused without experts"),
    Rule("model.embedding_init_std", "approximate", "mcore: init_method_std", "random init only"),
    Rule("model.attn_wqkv_init_std", "approximate", "mcore: init_method_std", "random init only"),
    Rule("model.attn_other_init_std", "approximate", "mcore: init_method_std", "random init only"),
    Rule("model.ffn_uplayer_init_std", "approximate", "mcore: init_method_std", "random init only"),
    Rule("model.ffn_other_init_std", "approximate", "mcore: init_method_std", "random init only"),
    Rule("model.out_head_init_std", "approximate", "mcore: init_method_std", "random init only"),
    Rule("model.init_type", "approximate", "mcore: init_method (normal)", "random init only"),
    # parallel
    Rule("parallel.zero1", "exact", "ds: zero_optimization.stage = 1", judge=_zero1),
    Rule("parallel.zero1.size", "exact", "ds: zero_optimization.stage = 1", judge=_zero1),
    Rule("parallel.zero1.fsdp", "exact", "ds: zero_optimization.stage = 1", judge=_fsdp),
    Rule("parallel.tensor", "exact", "mcore: tensor_model_parallel_size"),
    Rule("parallel.tensor.size", "exact", "mcore: tensor_model_parallel_size"),
    Rule("parallel.tensor.mode", "exact", "mcore: sequence_parallel (msp/fsp)", judge=_tensor_mode),
    Rule("parallel.sequence_parallel", "exact", "mcore: sequence_parallel",
         "legacy top-level flag: with an int tensor size it means mode 'msp'"),
    Rule("parallel.pipeline", "exact", "mcore: pipeline_model_parallel_size"),
    Rule("parallel.pipeline.size", "exact", "mcore: pipeline_model_parallel_size"),
    Rule("parallel.pipeline.interleaved_overlap", "exact", "mcore: overlap_p2p_comm (batch_p2p_comm = not overlap)"),
    Rule("parallel.weight", "unsupported", "-", "weight parallelism belongs to isp", _weight),
    Rule("parallel.weight.size", "unsupported", "-", "weight parallelism belongs to isp", _weight),
    Rule("parallel.weight.overlap", "unsupported", "-", "weight parallelism belongs to isp", _weight),
    Rule("parallel.weight.memory_pool", "unsupported", "-", "weight parallelism belongs to isp", _weight),
    # data
    Rule("data.seq_len", "exact", "mcore schedule: seq_length; model: max_sequence_length"),
    Rule("data.micro_num", "exact",
         "mcore schedule: num_microbatches; ds: train_micro_batch_size_per_gpu = micro_num*micro_bsz, "
         "gradient_accumulation_steps = 1 (megatron-core's schedule owns the micro-batches)"),
    Rule("data.micro_bsz", "exact",
         "train: micro_bsz sequences packed into one row of micro_bsz*seq_len tokens (cu_seqlens)"),
    Rule("data.gradient_accumulation", "exact", "mcore schedule: num_microbatches"),
    Rule("data.packed_length", "exact", "-", "InternEvo ignores it and uses seq_len*micro_bsz; so do we"),
    Rule("data.valid_micro_num", "exact", "train: validation micro-batches", _DATA_NOTE),
    Rule("data.valid_every", "exact", "train: validation interval", _DATA_NOTE),
    Rule("data.pack_sample_into_one", "exact", "train: packing mode", _DATA_NOTE),
    Rule("data.total_steps", "exact", "train: total optimizer steps; ds: scheduler.params.total_num_steps"),
    Rule("data.skip_batches", "exact", "train: skipped batch ranges", _DATA_NOTE),
    Rule("data.rampup_batch_size", "approximate", "train: micro-batches per step",
         "DeepSpeed's train_batch_size is fixed at start-up; its sample counters read the final batch size "
         "during ramp-up (the schedule itself uses the ramped size)", _rampup),
    Rule("data.min_length", "exact", "train: sample filter", _DATA_NOTE),
    Rule("data.min_length_dict", "exact", "train: per-folder sample filter", _DATA_NOTE),
    Rule("data.train_folder", "exact", "train: tokenized dataset folder (synthetic data when unset)", _DATA_NOTE),
    Rule("data.valid_folder", "exact", "train: validation dataset folder", _DATA_NOTE),
    Rule("data.use_packed_dataset", "exact", "train: packed (cu_seqlens) batches", _DATA_NOTE),
    Rule("data.fixed_random_dataset_seqlen", "exact", "train: synthetic dataset", _DATA_NOTE),
    Rule("data.seed", "exact", "train: sampler seed", _DATA_NOTE),
    Rule("data.num_worker", "exact", "train: data-loader worker processes"),
    Rule("data.type", "exact", "train: dataset type", "only 'tokenized' is read"),
    Rule("data.empty_cache_and_diag_interval", "unsupported", "-", "InternEvo's straggler diagnosis is not run"),
    Rule("data.diag_outlier_ratio", "unsupported", "-", "InternEvo's straggler diagnosis is not run"),
    Rule("data.train_folder_split", "unsupported", "-", "not read"),
    # optimizer and schedules
    Rule("adam.lr", "exact", "ds: optimizer.params.lr (peak lr of the schedule)"),
    Rule("adam.adam_beta1", "exact", "ds: optimizer.params.betas[0]"),
    Rule("adam.adam_beta2", "exact", "ds: optimizer.params.betas[1]"),
    Rule("adam.adam_beta2_c", "exact", "-", judge=_beta2_c),
    Rule("adam.adam_eps", "exact", "ds: optimizer.params.eps"),
    Rule("adam.weight_decay", "exact", "ds: optimizer.params.weight_decay",
         "applied to every parameter (norms, biases, embeddings), as InternEvo does"),
    Rule("lr_scheduler.total_steps", "exact", "ds: scheduler.params.total_num_steps", judge=_lr_schedule),
    Rule("lr_scheduler.init_steps", "exact", "ds: folded into scheduler.params.warmup_num_steps", judge=_lr_schedule),
    Rule("lr_scheduler.warmup_ratio", "exact", "ds: scheduler.params.warmup_num_steps", judge=_lr_schedule),
    Rule("lr_scheduler.eta_min", "exact", "ds: scheduler.params.cos_min_ratio = eta_min / lr", judge=_lr_schedule),
    Rule("lr_scheduler.last_epoch", "exact", "ds: scheduler.params.last_batch_iteration"),
    Rule("beta2_scheduler.init_beta2", "exact", "ds: optimizer.params.betas[1]", judge=_beta2_c),
    Rule("beta2_scheduler.c", "exact", "-", judge=_beta2_c),
    Rule("beta2_scheduler.cur_iter", "exact", "-", "InternEvo restarts it at every launch too"),
    Rule("grad_scaler.fp16", "exact", "ds: fp16"),
    Rule("grad_scaler.fp16.initial_scale", "exact", "ds: fp16.initial_scale_power = log2(initial_scale)",
         judge=_initial_scale),
    Rule("grad_scaler.fp16.min_scale", "exact", "ds: fp16.min_loss_scale", judge=_fp16_only),
    Rule("grad_scaler.fp16.growth_interval", "exact", "ds: fp16.loss_scale_window", judge=_growth),
    Rule("grad_scaler.growth_factor", "exact", "-", judge=_growth),
    Rule("grad_scaler.backoff_factor", "exact", "-", judge=_growth),
    Rule("grad_scaler.max_scale", "exact", "-", judge=_max_scale),
    Rule("grad_scaler.hysteresis", "exact", "ds: fp16.hysteresis (consecutive_hysteresis = false)",
         judge=_fp16_only),
    Rule("hybrid_zero_optimizer.overlap_sync_grad", "exact", "ds: zero_optimization.overlap_comm",
         judge=_overlap_grad),
    Rule("hybrid_zero_optimizer.zero_overlap_communication", "exact", "ds: zero_optimization.overlap_comm",
         "old alias of overlap_sync_grad", judge=_overlap_grad),
    Rule("hybrid_zero_optimizer.overlap_sync_param", "exact", "-", judge=_overlap_param),
    Rule("hybrid_zero_optimizer.reduce_bucket_size", "exact",
         "ds: zero_optimization.reduce_bucket_size and allgather_bucket_size (both count elements)"),
    Rule("hybrid_zero_optimizer.clip_grad_norm", "exact", "ds: gradient_clipping (0 in fp32)", judge=_clip),
    Rule("loss.label_smoothing", "exact", "train: cross-entropy label smoothing"),
    Rule("loss.moe_loss_coeff", "exact", "-", "no MoE models"),
    # options of this adapter, in a section InternEvo does not read
    Rule("adapter.clip_grad_in_fp32", "exact", "ds: gradient_clipping = clip_grad_norm in fp32", judge=_clip_option),
    # checkpoints
    Rule("ckpt.enable_save_ckpt", "exact", "train: save checkpoints", _CKPT_NOTE),
    Rule("ckpt.save_ckpt_folder", "exact", "train: checkpoint folder (local: or boto3:)", _CKPT_NOTE),
    Rule("ckpt.load_ckpt_folder", "exact", "train: resume everything", _CKPT_NOTE),
    Rule("ckpt.load_model_only_folder", "exact", "train: initialise weights only", _CKPT_NOTE),
    Rule("ckpt.load_optimizer", "exact", "train: resume optimizer state", _CKPT_NOTE),
    Rule("ckpt.load_given_ckpt", "exact", "train: legacy resume switch", _CKPT_NOTE),
    Rule("ckpt.load_ckpt_info", "exact", "train: what to load from where", _CKPT_NOTE),
    Rule("ckpt.checkpoint_every", "exact", "train: save interval", _CKPT_NOTE),
    Rule("ckpt.async_upload", "exact", "train: async upload", judge=_async_upload),
    Rule("ckpt.async_upload_tmp_folder", "exact", "train: async upload staging folder", judge=_async_upload),
    Rule("ckpt.snapshot_ckpt_folder", "exact", "train: snapshot folder (two alternating slots)", _CKPT_NOTE),
    Rule("ckpt.oss_snapshot_freq", "exact", "train: snapshot interval", _CKPT_NOTE),
    Rule("ckpt.auto_resume", "exact", "train: resume from the newest complete checkpoint", _CKPT_NOTE),
    Rule("ckpt.stop_file_path", "exact", "train: stop file asking for a save", _CKPT_NOTE),
)


@dataclass(frozen=True)
class Checked:
    """What InternEvo's own training runs exercise of one field (``tests/fixtures/internevo/internlm2_traj_*``,
    8 steps each, matched by ``tests/train/test_internevo_trajectory.py``)."""

    values: tuple[Any, ...] | None = None
    """The values the runs use; ``None``: the field enters a formula the runs exercise, so any value."""
    fp32_only: bool = False
    """The runs are fp32; in fp16/bf16 the field does something they do not exercise."""


_ANY, _FP32 = Checked(), Checked(fp32_only=True)

#: Training-behaviour fields whose "exact" is backed by InternEvo's own runs. A training field (``TRAINING``)
#: absent here, or given a value the runs do not exercise, is reported ``approximate`` rather than ``exact``:
#: its rule was read from InternEvo's source but never held against an InternEvo run.
CHECKED_BY_INTERNEVO_RUNS: dict[str, Checked] = {
    "model.dtype": Checked(("torch.float32",)),
    "parallel.zero1.size": _ANY, "parallel.zero1": _ANY,  # the int form of zero1.size
    "parallel.zero1.fsdp": Checked((False,)),
    "data.seq_len": _ANY, "data.micro_num": _ANY, "data.micro_bsz": _ANY, "data.total_steps": _ANY,
    "data.train_folder": _ANY, "data.seed": _ANY, "data.num_worker": _ANY,
    "data.valid_every": Checked((0,)), "data.valid_micro_num": _ANY, "data.valid_folder": Checked((None,)),
    "data.pack_sample_into_one": Checked((False,)), "data.use_packed_dataset": Checked((True,)),
    "data.skip_batches": Checked(("",)), "data.rampup_batch_size": Checked(("",)), "data.min_length": Checked((0,)),
    "data.type": Checked(("tokenized",)),
    "adam.lr": _ANY, "adam.adam_beta1": _ANY, "adam.adam_beta2": _ANY, "adam.adam_eps": _ANY,
    "adam.weight_decay": _ANY, "adam.adam_beta2_c": Checked((0,)),
    "lr_scheduler.total_steps": _ANY, "lr_scheduler.warmup_ratio": _ANY, "lr_scheduler.eta_min": _ANY,
    "lr_scheduler.init_steps": Checked((0,)), "lr_scheduler.last_epoch": Checked((-1,)),
    "beta2_scheduler.init_beta2": _ANY, "beta2_scheduler.c": Checked((0,)), "beta2_scheduler.cur_iter": Checked((-1,)),
    "grad_scaler.fp16.initial_scale": _FP32, "grad_scaler.fp16.min_scale": _FP32,
    "grad_scaler.fp16.growth_interval": _FP32, "grad_scaler.growth_factor": _FP32,
    "grad_scaler.backoff_factor": _FP32, "grad_scaler.max_scale": _FP32, "grad_scaler.hysteresis": _FP32,
    "hybrid_zero_optimizer.clip_grad_norm": _FP32, "hybrid_zero_optimizer.reduce_bucket_size": _ANY,
    "hybrid_zero_optimizer.overlap_sync_grad": Checked((False,)),
    "hybrid_zero_optimizer.overlap_sync_param": Checked((False,)),
    "loss.label_smoothing": Checked((0,)),
}
TRAINING = ("model.dtype", "parallel.zero1", "data.", "adam.", "lr_scheduler.", "beta2_scheduler.", "grad_scaler.",
            "hybrid_zero_optimizer.", "loss.")
UNCHECKED_NOTE = ("not claimed exact: InternEvo's rule as read from its source, but no InternEvo-written run "
                  "exercises this value")


def is_training(path: str) -> bool:
    """Whether ``path`` shapes the training numbers (optimizer, schedules, data order, precision)."""
    return any(path == t or path.startswith(t if t.endswith(".") else t + ".") for t in TRAINING)


def checked_by_internevo_runs(cfg: "InternLMConfig", path: str, value: Any) -> bool:
    """Whether InternEvo's own runs exercise ``path`` with ``value`` (see ``CHECKED_BY_INTERNEVO_RUNS``)."""
    checked = CHECKED_BY_INTERNEVO_RUNS.get(path)
    if checked is None or (checked.fp32_only and cfg.model.dtype != "fp32"):
        return False
    return checked.values is None or any(same_value(value, v) for v in checked.values)


def same_value(a: Any, b: Any) -> bool:
    """Equal values, except that booleans never equal numbers (``False == 0`` in Python)."""
    return a is b if isinstance(a, bool) or isinstance(b, bool) else a == b


_BY_PATH = {rule.path: rule for rule in RULES}
_FREE_FORM = ("monitor", "moe", "gradient_handler", "ckpt.load_ckpt_info", "data.min_length_dict")
TOP_LEVEL_KEYS = frozenset(p for p in _BY_PATH if "." not in p)

#: Defaults of the boolean model flags InternEvo's builders use when a key is absent.
MODEL_BOOL_DEFAULTS = {
    "model.embed_split_hidden": True,
    "model.apply_post_layer_norm": False,
    "model.residual_in_fp32": False,
    "model.is_reward": False,
    "model.dropout_selective_checkpoint": True,
    "model.use_scaled_init": True,
    "model.use_swiglu": True,
    "model.deepnorm": False,
    "model.norm_head": False,
    "model.mlp_layer_fusion": False,
}

_SECTIONS = frozenset(p.rsplit(".", 1)[0] for p in _BY_PATH if "." in p)


def rule_for(path: str) -> Rule | None:
    """The rule for a dotted leaf path, falling back to its nearest free-form ancestor."""
    while path:
        if path in _BY_PATH:
            return _BY_PATH[path]
        path = path.rsplit(".", 1)[0] if "." in path else ""
    return None


def is_known(path: str) -> bool:
    return path in _BY_PATH or path in _SECTIONS


def is_free_form(path: str) -> bool:
    return any(path == p or path.startswith(p + ".") for p in _FREE_FORM)


def has_children(path: str) -> bool:
    return path in _SECTIONS


def known_children(prefix: str) -> list[str]:
    """Names of the known keys directly under ``prefix`` (``""`` for the top level)."""
    names = set()
    for path in list(_BY_PATH) + list(_SECTIONS):
        if prefix:
            if path.startswith(prefix + ".") and "." not in path[len(prefix) + 1:]:
                names.add(path[len(prefix) + 1:])
        elif "." not in path:
            names.add(path)
    return sorted(names)
