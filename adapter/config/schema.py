"""Typed, normalised form of an InternEvo config (torch-free).

``normalize.normalize`` fills these from a loaded file, applying InternEvo 0.5.2's defaults and
collapsing its variant spellings (``zero1=8`` vs ``dict(size=8)``, ``tensor=2`` vs
``dict(size=2, mode="mtp")``, dtype strings, ``checkpoint=True``...). Every later stage (translators,
model, training, checkpoints) reads only these classes, never the raw dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from adapter.config.errors import ConfigError

Family = Literal["internlm1", "internlm2", "llama2"]
DType = Literal["bf16", "fp16", "fp32"]
TensorMode = Literal["mtp", "msp", "fsp", "isp"]

#: InternEvo ``model_type`` → model family built by this adapter. LLAMA2 (InternEvo's ``Llama2``) is InternLM2's
#: architecture with separate ``wq``/``wk``/``wv`` weights, so megatron-core builds both the same way.
MODEL_TYPES: dict[str, Family] = {"INTERNLM": "internlm1", "INTERNLM2_PUBLIC": "internlm2", "LLAMA2": "llama2"}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The ``model`` section plus ``model_type`` and ``use_fp32_norm``."""

    model_type: str
    family: Family
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_attention_heads: int
    """Equals ``num_attention_heads`` for InternLM1 (no GQA); InternLM2 and LLAMA2 may group the kv heads."""
    vocab_size: int
    mlp_ratio: float
    ffn_hidden_size: int
    """``multiple_of * ceil(int(hidden_size * mlp_ratio) / multiple_of)``, InternEvo's FeedForward rule."""
    multiple_of: int
    norm_type: Literal["rmsnorm", "layernorm"]
    layer_norm_epsilon: float
    dtype: DType
    tf32: bool
    """``dtype="torch.tf32"``: fp32 params with TF32 matmuls."""
    checkpoint: float
    """Fraction of each chunk's layers (the first ``int(n * checkpoint)``) that recompute activations."""
    num_chunks: int
    """Virtual pipeline stages per pipeline rank (InternEvo keeps it under ``model``)."""
    use_flash_attn: bool
    rope_base: float
    qk_interleaved: bool
    no_bias: bool
    """InternLM2 and LLAMA2: drop the attention biases (``wqkv``/``wq``, ``wk``, ``wv`` and ``wo``); InternEvo's
    default is False, so both have them unless told. InternLM1 always has them. No family has MLP biases."""
    embed_grad_scale: float
    parallel_output: bool
    use_dynamic_ntk_rope: bool
    max_position_embeddings: int
    use_fp32_norm: bool
    drop_rate: float
    """Dropout on the residual branches (megatron-core's ``hidden_dropout``)."""
    attn_drop_rate: float
    """Dropout on the attention probabilities (megatron-core's ``attention_dropout``)."""
    residual_in_fp32: bool
    """Keep the residual stream in fp32 (megatron-core's ``fp32_residual_connection``)."""
    mlp_layer_fusion: bool
    """InternEvo keeps each MLP's ``w1`` and ``w3`` as one parameter ``fused_w1_w3`` = [w1; w3] per tensor
    rank (its files hold them split either way): the same model, but another parameter list for its
    optimizer's partitions (``train.internevo_state.parameters``)."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        """InternLM1 always has a qkv bias; InternLM2 and LLAMA2 unless ``no_bias``."""
        return self.family == "internlm1" or not self.no_bias

    @property
    def out_proj_bias(self) -> bool:
        """The attention output projection has a bias exactly when qkv does (every family)."""
        return self.qkv_bias


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """The ``parallel`` section with every variant form collapsed."""

    tensor_size: int
    tensor_mode: TensorMode
    sequence_parallel: bool
    pipeline_size: int
    interleaved_overlap: bool
    zero1_size: int
    """``<= 0`` means the whole data-parallel group, ``1`` means no ZeRO, ``n`` means groups of ``n`` dp ranks."""
    fsdp: bool
    weight_size: int


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    seq_len: int
    micro_num: int
    """Micro-batches per optimizer step (per data-parallel rank)."""
    micro_bsz: int
    """Sequences packed into one micro-batch row of ``packed_length = micro_bsz * seq_len`` tokens."""
    gradient_accumulation: int
    valid_micro_num: int
    valid_every: int
    pack_sample_into_one: bool
    total_steps: int
    skip_batches: tuple[tuple[int, int], ...]
    """Inclusive ``batch_count`` ranges to skip, parsed from ``"a-b,c"``."""
    rampup_batch_size: tuple[int, int, int] | None
    """``(start, increment, every)`` in micro-batches, parsed from ``"start incr every"``."""
    min_length: int
    train_folder: str | None
    valid_folder: str | None
    use_packed_dataset: bool
    fixed_random_dataset_seqlen: bool
    seed: int
    num_worker: int
    """DataLoader worker processes per rank reading and collating batches (0: in the training process)."""

    @property
    def packed_length(self) -> int:
        return self.seq_len * self.micro_bsz


@dataclass(frozen=True, kw_only=True)
class AdamConfig:
    lr: float
    beta1: float
    beta2: float
    beta2_c: float
    eps: float
    weight_decay: float


@dataclass(frozen=True, kw_only=True)
class LRSchedulerConfig:
    """``FineTuneCosineAnnealingWarmupLR``: linear warmup, then cosine to ``eta_min``."""

    total_steps: int
    init_steps: int
    warmup_ratio: float
    eta_min: float
    last_epoch: int

    @property
    def warmup_steps(self) -> int:
        return int(self.total_steps * self.warmup_ratio)


@dataclass(frozen=True, kw_only=True)
class Beta2SchedulerConfig:
    init_beta2: float
    c: float
    cur_iter: int


@dataclass(frozen=True, kw_only=True)
class GradScalerConfig:
    initial_scale: float
    min_scale: float
    growth_interval: int
    growth_factor: float
    backoff_factor: float
    max_scale: float
    hysteresis: int


@dataclass(frozen=True, kw_only=True)
class ZeroOptimizerConfig:
    """``hybrid_zero_optimizer``. ``reduce_bucket_size`` counts elements, as DeepSpeed's does."""

    overlap_sync_grad: bool
    overlap_sync_param: bool
    reduce_bucket_size: int
    clip_grad_norm: float
    clip_in_fp32: bool = False
    """``adapter.clip_grad_in_fp32``: clip fp32 runs too (InternEvo 0.5.2 does not, see ``applied_clip_grad_norm``)."""


@dataclass(frozen=True, kw_only=True)
class CkptConfig:
    enable_save_ckpt: bool
    save_ckpt_folder: str | None
    load_ckpt_folder: str | None
    load_model_only_folder: str | None
    load_optimizer: bool
    checkpoint_every: int | None
    """``None`` when saving is disabled (InternEvo's ``inf``)."""
    async_upload: bool
    async_upload_tmp_folder: str | None
    snapshot_ckpt_folder: str | None
    oss_snapshot_freq: int | None
    """``None`` disables snapshots (InternEvo's ``inf``)."""
    auto_resume: bool
    stop_file_path: str | None
    load_ckpt_info: dict[str, Any] | None


@dataclass(frozen=True, kw_only=True)
class InternLMConfig:
    """A whole InternEvo training config, normalised."""

    source: str
    job_name: str
    model: ModelConfig
    parallel: ParallelConfig
    data: DataConfig
    adam: AdamConfig
    lr_scheduler: LRSchedulerConfig
    beta2_scheduler: Beta2SchedulerConfig
    grad_scaler: GradScalerConfig
    zero_optimizer: ZeroOptimizerConfig
    label_smoothing: float
    ckpt: CkptConfig
    cudnn_deterministic: bool
    cudnn_benchmark: bool
    enable_tb: bool
    tensorboard_folder: str | None
    given: dict[str, Any] = field(default_factory=dict)
    """Every leaf the user wrote, as dotted path → value (for the fidelity report)."""
    defaulted: dict[str, Any] = field(default_factory=dict)
    """Every field InternEvo would fill in with a default, as dotted path → default value."""
    lines: dict[str, int] = field(default_factory=dict, repr=False)
    """Dotted path → line in ``source``, so later checks can point at the line."""

    @property
    def applied_clip_grad_norm(self) -> float:
        """The max norm gradients are clipped to (0: no clipping; the norm is still computed and reported).

        InternEvo 0.5.2 clips only in fp16/bf16: ``HybridZeroOptimizer._step`` unscales and clips
        ``if gpc.config.model.dtype is not torch.float32`` (``torch.tf32`` becomes float32 too), so in fp32
        ``clip_grad_norm`` decides only whether the norm is computed and AdamW gets the unclipped gradient
        (measured in the ``internlm2_traj_*`` fixtures). ``adapter.clip_grad_in_fp32=True`` clips anyway.
        """
        zo = self.zero_optimizer
        return zo.clip_grad_norm if self.model.dtype != "fp32" or zo.clip_in_fp32 else 0.0

    def error(self, path: str, message: str) -> ConfigError:
        """A ``ConfigError`` for ``path``, located at its line in the config file when known."""
        parts = path.split(".")
        while parts and ".".join(parts) not in self.lines:
            parts.pop()
        return ConfigError(path, message, source=self.source, line=self.lines.get(".".join(parts)))
