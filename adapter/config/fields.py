"""Every InternEvo config key we know: how to read it, its default, where it goes, and how faithfully.

One row per dotted key. The table drives the code: ``normalize`` reads every row as its ``kind`` says (type,
bounds, choices, InternEvo 0.5.2's default), puts the value into the typed attribute named by ``into``, refuses
values megatron-core cannot build (``requires``) and keys the model family's InternEvo builder does not take
(``families``); the unknown-key check and the fidelity report read the same rows. ``to`` says where the
translators put the value, and a test holds every verbatim target to the rendered outputs.

``status`` is how faithfully DeepSpeed + megatron-core (as this adapter drives them) reproduce InternEvo's
behaviour for that key:

* ``exact``: same numbers (or the key has no effect in InternEvo 0.5.2 either),
* ``approximate``: close, and the note says how it differs,
* ``unsupported``: no equivalent, and the note says what the user loses.

A row's ``judge`` refines the status from the value actually given (``judges.py``). This module stays
torch-free: the command-line check imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

from adapter.config import judges, parsers
from adapter.config.judges import Judge, Status

if TYPE_CHECKING:
    from adapter.config.schema import InternLMConfig

Kind = Literal["int", "float", "bool", "str", "ratio", "count", "dict", "any"]
"""How a value is read: ``ratio`` is True, False or a fraction in [0, 1]; ``count`` is an int where ``None`` or
``float("inf")`` mean "never" (read as ``None``); ``any`` is taken as written (then ``parse``\\d)."""
Where = Literal["ds", "mcore", "model", "args", "train"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""The default of a key InternEvo cannot run without."""


@dataclass(frozen=True)
class Same:
    """A default that is the normalised value of another key (``lr_scheduler.total_steps`` → ``data.total_steps``)."""

    path: str


@dataclass(frozen=True)
class Target:
    """One place a translator writes the value.

    ``where``: ``ds`` (ds_config.json, dotted keys, list items by index), ``mcore`` (TransformerConfig field),
    ``model`` (ModelOptions field), ``args`` (Megatron-LM argument; a switch for booleans) or ``train`` (read at
    run time by the training entry point). A ``verbatim`` target carries the typed value of ``attr`` (default: the
    row's ``into``) unchanged; the others follow from it as ``formula`` says.
    """

    where: Where
    key: str
    attr: str | None = None
    formula: str = ""
    verbatim: bool = True

    def describe(self) -> str:
        return f"{self.where}: {self.key}{' ' + self.formula if self.formula else ''}"


def ds(key: str, attr: str | None = None, formula: str = "") -> Target:
    return Target("ds", key, attr, formula)


def mcore(key: str, attr: str | None = None, formula: str = "") -> Target:
    return Target("mcore", key, attr, formula)


def opt(key: str, attr: str | None = None, formula: str = "") -> Target:
    return Target("model", key, attr, formula)


def arg(flag: str, attr: str | None = None, formula: str = "") -> Target:
    return Target("args", flag, attr, formula)


def derived(where: Where, key: str, formula: str) -> Target:
    """An output that follows from the value without carrying it (``zero_optimization.stage = 1``)."""
    return Target(where, key, formula=formula, verbatim=False)


def run(what: str) -> Target:
    """Behaviour of the training entry point, with no key in the translated files."""
    return Target("train", what, verbatim=False)


@dataclass(frozen=True)
class Field:
    """One InternEvo key. Rows without a ``kind`` are not read by the loop: a variant spelling that
    ``spellings.py`` rewrites, or a key that is only reported."""

    path: str
    kind: Kind | None = None
    default: Any = None
    """InternEvo 0.5.2's value when the key is absent, ``REQUIRED``, or ``Same(path)``."""
    into: str | None = None
    """The typed attribute it fills, dotted from ``InternLMConfig`` (``"adam.beta1"``); ``None``: only checked."""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    nullable: bool | None = None
    """Whether ``None`` is accepted; by default exactly when the default is ``None``."""
    parse: Callable[[Any], Any] | None = None
    """Turns the checked value into the typed one; raises ``ValueError`` with the message for the user."""
    families: tuple[str, ...] = ()
    """Model families whose InternEvo builder takes the key (empty: all); it is refused for the others."""
    why_not: str = ""
    """The refusal for other families, when the generic one (the builder has no such argument) would mislead."""
    requires: tuple[Any, str] | None = None
    """(the only value megatron-core can build the same way, why); other values are refused."""
    status: Status = "exact"
    to: tuple[Target, ...] = ()
    note: str = ""
    judge: Judge | None = None
    free_form: bool = False
    """Its value may hold keys of its own that are not checked (``monitor``, ``load_ckpt_info``)."""

    @property
    def accepts_none(self) -> bool:
        return self.default is None if self.nullable is None else self.nullable

    def takes(self, family: str) -> bool:
        return not self.families or family in self.families

    @property
    def target(self) -> str:
        """The targets as the fidelity report prints them (``-``: none)."""
        return "; ".join(t.describe() for t in self.to) or "-"


#: The class InternEvo 0.5.2's ``model_initializer`` builds for each family (``internlm/model/registry.py``).
BUILDERS = {"internlm1": "InternLM1 (internlm/model/modeling_internlm.py)",
            "internlm2": "InternLM2 (internlm/model/modeling_internlm2.py)",
            "llama2": "Llama2 (internlm/model/modeling_llama.py)"}
#: Families whose builder takes the NTK-rope, MoE and norm-head keys; InternEvo's Llama2 has no such arguments.
_INTERNLM = ("internlm1", "internlm2")
_CKPT_NOTE = "read by the training entry point's checkpoint manager, not by DeepSpeed or megatron-core"
_DATA_NOTE = "read by the training entry point's InternEvo-compatible data pipeline"
_FP16 = "(fp16 runs)"
_INIT = "random init only: megatron-core's init_method_std (0.02) draws every weight"
_WEIGHT = "weight parallelism belongs to isp"

FIELDS: tuple[Field, ...] = (
    # top level
    Field("JOB_NAME", "str", "AnonymousJob", "job_name", to=(run("run name in logs and TensorBoard"),)),
    Field("model_type", "str", "INTERNLM", "model.model_type", to=(opt("family", "model.family"),),
          note="INTERNLM → internlm1, INTERNLM2_PUBLIC → internlm2, LLAMA2 → llama2"),
    Field("DO_ALERT", status="unsupported", note="Feishu alerting is not part of this adapter",
          judge=judges.off_is_exact),
    Field("cudnn_deterministic", "bool", False, "cudnn_deterministic",
          to=(run("torch.backends.cudnn.deterministic"),)),
    Field("cudnn_benchmark", "bool", False, "cudnn_benchmark", to=(run("torch.backends.cudnn.benchmark"),)),
    Field("use_fp32_norm", "bool", False, "model.use_fp32_norm",
          note="RMSNorm math is fp32 in megatron-core either way",
          judge=judges.must_be(False, "norm weights are stored in the model dtype, not kept in fp32")),
    Field("enable_tb", "bool", True, "enable_tb", to=(run("TensorBoard writer on the last pipeline stage"),)),
    Field("tensorboard_folder", "str", None, "tensorboard_folder", to=(run("TensorBoard log folder"),)),
    Field("resume_tb_folder", status="unsupported", note="TensorBoard logs are not copied from an earlier run",
          judge=judges.off_is_exact),
    Field("alert_address", status="unsupported", note="alerting is not part of this adapter",
          judge=judges.off_is_exact),
    Field("metric_dtype", status="unsupported", note="metrics are computed in fp32 always"),
    Field("monitor", "dict", None, free_form=True, status="unsupported",
          note="Feishu alerts and light-monitor heartbeats are not part of this adapter", judge=judges.off_is_exact),
    Field("gradient_handler", free_form=True, note="DeepSpeed ZeRO-1 reduces gradients itself"),
    Field("only_load_lr", status="unsupported", note="resuming only the learning rate is not supported",
          judge=judges.off_is_exact),
    Field("output_tf32", status="unsupported", note="not read", judge=judges.off_is_exact),
    Field("moe", free_form=True, status="unsupported", note="mixture-of-experts models are not supported",
          judge=judges.off_is_exact),
    # model
    Field("model.num_layers", "int", REQUIRED, "model.num_layers", minimum=1,
          to=(mcore("num_layers"), arg("--num-layers"))),
    Field("model.hidden_size", "int", REQUIRED, "model.hidden_size", minimum=1,
          to=(mcore("hidden_size"), arg("--hidden-size"))),
    Field("model.num_attention_heads", "int", REQUIRED, "model.num_attention_heads", minimum=1,
          to=(mcore("num_attention_heads"), arg("--num-attention-heads"))),
    Field("model.num_kv_attention_heads", "int", Same("model.num_attention_heads"), "model.num_kv_attention_heads",
          minimum=1, families=("internlm2", "llama2"),
          why_not="InternLM1 (model_type 'INTERNLM') has no grouped-query attention; use "
                  "model_type='INTERNLM2_PUBLIC' for GQA",
          to=(mcore("num_query_groups"), arg("--num-query-groups", formula="(with --group-query-attention)"))),
    Field("model.vocab_size", "int", REQUIRED, "model.vocab_size", minimum=1,
          to=(opt("vocab_size"), arg("--vocab-size")), note="no padding, as InternEvo"),
    Field("model.mlp_ratio", "float", 4.0, "model.mlp_ratio", minimum=0.0,
          to=(mcore("ffn_hidden_size", "model.ffn_hidden_size"), arg("--ffn-hidden-size", "model.ffn_hidden_size")),
          note="ffn_hidden_size = multiple_of * ceil(int(hidden_size * mlp_ratio) / multiple_of)"),
    Field("model.multiple_of", "int", 256, "model.multiple_of", minimum=1,
          to=(mcore("ffn_hidden_size", "model.ffn_hidden_size"), arg("--ffn-hidden-size", "model.ffn_hidden_size"))),
    Field("model.norm_type", "str", "rmsnorm", "model.norm_type", parse=parsers.norm_type,
          to=(derived("mcore", "normalization", "= RMSNorm, or LayerNorm for any other value"),
              derived("args", "--normalization", "= RMSNorm or LayerNorm"))),
    Field("model.layer_norm_epsilon", "float", 1e-5, "model.layer_norm_epsilon", minimum=0.0,
          to=(mcore("layernorm_epsilon"), arg("--norm-epsilon"))),
    Field("model.dtype", "str", "torch.float16", choices=tuple(parsers.DTYPES), parse=parsers.dtype,
          to=(derived("ds", "bf16 / fp16", "sections"),
              derived("mcore", "params_dtype, pipeline_dtype, bf16, fp16", ""),
              derived("args", "--bf16 / --fp16", "")), judge=judges.dtype),
    Field("model.checkpoint", "ratio", False, "model.checkpoint",
          to=(opt("recompute_ratio"),
              derived("mcore", "recompute_granularity, recompute_method, recompute_num_layers",
                      "= 'full', 'block', int(local layers * ratio) ('uniform', 1 for the whole chunk)"),
              derived("args", "--recompute-*", "as in transformer_config.yaml")), judge=judges.checkpoint),
    Field("model.num_chunks", "int", 1, "model.num_chunks", minimum=1,
          to=(derived("mcore", "virtual_pipeline_model_parallel_size", "(None for 1)"),
              derived("mcore", "pipeline_model_parallel_layout", "from InternEvo's partition_uniform"))),
    Field("model.use_flash_attn", "bool", True, "model.use_flash_attn",
          to=(run("flash-attn varlen core attention on CUDA when installed, torch SDPA otherwise (both honour "
                  "cu_seqlens)"),), judge=judges.flash_packing),
    Field("model.rope_base", "float", 10000.0, "model.rope_base", minimum=1.0,
          to=(opt("rotary_base"), arg("--rotary-base"))),
    Field("model.qk_interleaved", "bool", False, "model.qk_interleaved",
          to=(mcore("rotary_interleaved"), arg("--rotary-interleaved"))),
    Field("model.adapt_hf", families=_INTERNLM,
          to=(mcore("rotary_interleaved", "model.qk_interleaved", "= not adapt_hf"),),
          note="older spelling: qk_interleaved = not adapt_hf"),
    Field("model.no_bias", "bool", False, "model.no_bias",
          to=(mcore("add_qkv_bias", "model.qkv_bias"), opt("qkv_bias", "model.qkv_bias"),
              opt("out_proj_bias", "model.out_proj_bias"), arg("--add-qkv-bias", "model.qkv_bias")),
          note="no MLP bias either way"),
    Field("model.embed_grad_scale", "float", 1.0, "model.embed_grad_scale", minimum=0.0,
          note="1 leaves the embedding gradient unscaled, as here",
          judge=judges.must_be(1.0, "InternEvo scales the embedding gradient by embed_grad_scale; it is not applied "
                                    "here")),
    Field("model.parallel_output", "bool", True, "model.parallel_output", to=(opt("parallel_output"),),
          note="logits stay vocab-parallel for the parallel cross-entropy"),
    Field("model.embed_split_hidden", "bool", True, note="InternEvo 0.5.2 pops and ignores it too"),
    Field("model.apply_post_layer_norm", "bool", False, note="InternEvo 0.5.2 pops and ignores it (always pre-norm)"),
    Field("model.norm_head", "bool", False, families=_INTERNLM, note="computed and then unused in InternEvo 0.5.2"),
    Field("model.use_dynamic_ntk_rope", "bool", False, "model.use_dynamic_ntk_rope", families=_INTERNLM,
          requires=(False, "dynamic NTK rotary scaling is not supported")),
    Field("model.max_position_embeddings", "int", 2048, "model.max_position_embeddings", minimum=1,
          families=_INTERNLM, note="only used by dynamic NTK rope in InternEvo"),
    Field("model.drop_rate", "float", 0.0, "model.drop_rate", minimum=0.0, maximum=1.0,
          to=(mcore("hidden_dropout"), arg("--hidden-dropout")), judge=judges.drop),
    Field("model.attn_drop_rate", "float", 0.0, "model.attn_drop_rate", minimum=0.0, maximum=1.0,
          to=(mcore("attention_dropout"), arg("--attention-dropout")), judge=judges.drop),
    Field("model.residual_in_fp32", "bool", False, "model.residual_in_fp32",
          to=(mcore("fp32_residual_connection"), arg("--fp32-residual-connection"))),
    Field("model.is_reward", "bool", False, requires=(False, "reward-model heads are not supported")),
    Field("model.dropout_selective_checkpoint", "bool", True,
          note="a memory optimisation with no numerical effect at dropout 0"),
    Field("model.use_scaled_init", "bool", True, status="approximate",
          note="initialisation follows megatron-core's normal/scaled-normal scheme (its default "
               "output_layer_init_method), not InternEvo's exact draws"),
    Field("model.use_swiglu", "bool", True, requires=(True, "only the SwiGLU MLP (w2(silu(w1 x) * w3 x)) is supported"),
          to=(derived("mcore", "gated_linear_unit", "= True with activation_func silu"),
              derived("args", "--swiglu", "always"))),
    Field("model.deepnorm", "bool", False, families=_INTERNLM,
          requires=(False, "DeepNorm residual scaling is not supported")),
    Field("model.mlp_layer_fusion", "bool", False, "model.mlp_layer_fusion",
          note="megatron-core's linear_fc1 is always fused [w1; w3]; checkpoints keep w1/w3 split either way, as "
               "InternEvo's save hooks do"),
    Field("model.num_experts", "int", 1, minimum=1, families=_INTERNLM,
          requires=(1, "mixture-of-experts models are not supported")),
    Field("model.moe_type", "str", "GShard", families=_INTERNLM, note="unused without experts"),
    Field("model.moe_use_residual", "bool", False, families=_INTERNLM, note="unused without experts"),
    Field("model.embedding_init_std", "float", 0.02, minimum=0.0, status="approximate", note=_INIT),
    Field("model.attn_wqkv_init_std", "float", 0.02, minimum=0.0, status="approximate", note=_INIT),
    Field("model.attn_other_init_std", "float", 0.02, minimum=0.0, status="approximate", note=_INIT),
    Field("model.ffn_uplayer_init_std", "float", 0.02, minimum=0.0, status="approximate", note=_INIT),
    Field("model.ffn_other_init_std", "float", 0.02, minimum=0.0, status="approximate", note=_INIT),
    Field("model.out_head_init_std", "float", 0.02, minimum=0.0, status="approximate", note=_INIT),
    Field("model.init_type", "str", "normal", status="approximate",
          note="random init only: megatron-core draws from a normal distribution"),
    # parallel (an int for zero1, tensor, pipeline or weight is short for dict(size=...): spellings.py)
    Field("parallel.zero1", to=(derived("ds", "zero_optimization.stage", "= 1"),), judge=judges.zero1),
    Field("parallel.zero1.size", "int", -1, "parallel.zero1_size",
          to=(derived("ds", "zero_optimization.stage", "= 1"),
              derived("args", "--use-distributed-optimizer", "unless zero1 = 1")), judge=judges.zero1),
    Field("parallel.zero1.fsdp", "bool", False, "parallel.fsdp",
          to=(derived("ds", "zero_optimization.stage", "= 1"),), judge=judges.fsdp),
    Field("parallel.tensor", to=(mcore("tensor_model_parallel_size", "parallel.tensor_size"),
                                 arg("--tensor-model-parallel-size", "parallel.tensor_size"))),
    Field("parallel.tensor.size", "int", 1, "parallel.tensor_size", minimum=1,
          to=(mcore("tensor_model_parallel_size"), arg("--tensor-model-parallel-size"))),
    Field("parallel.tensor.mode", "str", "mtp", "parallel.tensor_mode", choices=("mtp", "msp", "fsp", "isp"),
          to=(derived("mcore", "sequence_parallel", "for msp/fsp with tensor size > 1"),), judge=judges.tensor_mode),
    Field("parallel.sequence_parallel", "bool", False,
          to=(derived("mcore", "sequence_parallel", "for msp/fsp with tensor size > 1"),),
          note="legacy top-level flag: with an int tensor size it means mode 'msp'",
          judge=judges.legacy_sequence_parallel),
    Field("parallel.pipeline", to=(mcore("pipeline_model_parallel_size", "parallel.pipeline_size"),
                                   arg("--pipeline-model-parallel-size", "parallel.pipeline_size"))),
    Field("parallel.pipeline.size", "int", 1, "parallel.pipeline_size", minimum=1,
          to=(mcore("pipeline_model_parallel_size"), arg("--pipeline-model-parallel-size"))),
    Field("parallel.pipeline.interleaved_overlap", "bool", False, "parallel.interleaved_overlap",
          to=(derived("mcore", "overlap_p2p_comm", "with virtual pipeline stages (batch_p2p_comm = not overlap)"),)),
    Field("parallel.weight", status="unsupported", note=_WEIGHT, judge=judges.weight),
    Field("parallel.weight.size", "int", 1, "parallel.weight_size", minimum=1, status="unsupported", note=_WEIGHT,
          judge=judges.weight),
    Field("parallel.weight.overlap", "bool", False, status="unsupported", note=_WEIGHT, judge=judges.weight),
    Field("parallel.weight.memory_pool", "bool", False, status="unsupported", note=_WEIGHT, judge=judges.weight),
    # data
    Field("data.seq_len", "int", REQUIRED, "data.seq_len", minimum=1,
          to=(opt("max_sequence_length"), arg("--seq-length"), arg("--max-position-embeddings"),
              run("megatron-core schedule: seq_length"))),
    Field("data.micro_num", "int", 1, "data.micro_num", minimum=1,
          to=(derived("ds", "train_micro_batch_size_per_gpu", "= micro_num * micro_bsz"),
              run("megatron-core schedule: num_microbatches")),
          note="ds: gradient_accumulation_steps = 1 (megatron-core's schedule owns the micro-batches)"),
    Field("data.micro_bsz", "int", REQUIRED, "data.micro_bsz", minimum=1,
          to=(arg("--micro-batch-size"), derived("ds", "train_micro_batch_size_per_gpu", "= micro_num * micro_bsz"),
              run("micro_bsz sequences packed into one row of micro_bsz*seq_len tokens (cu_seqlens)"))),
    Field("data.gradient_accumulation", "int", Same("data.micro_num"), "data.gradient_accumulation", minimum=1,
          to=(run("megatron-core schedule: num_microbatches"),)),
    Field("data.packed_length", note="InternEvo ignores it and uses seq_len*micro_bsz; so do we"),
    Field("data.valid_micro_num", "int", Same("data.micro_num"), "data.valid_micro_num", minimum=0,
          to=(run("validation micro-batches"),), note=_DATA_NOTE),
    Field("data.valid_every", "int", 0, "data.valid_every", minimum=0, to=(run("validation interval"),),
          note=_DATA_NOTE),
    Field("data.pack_sample_into_one", "bool", False, "data.pack_sample_into_one", to=(run("packing mode"),),
          note=_DATA_NOTE),
    Field("data.total_steps", "int", REQUIRED, "data.total_steps", minimum=1,
          to=(arg("--train-iters"), run("total optimizer steps"))),
    Field("data.skip_batches", "any", "", "data.skip_batches", parse=parsers.skip_batches,
          to=(run("skipped batch ranges"),), note=_DATA_NOTE),
    Field("data.rampup_batch_size", "any", "", "data.rampup_batch_size", parse=parsers.rampup_batch_size,
          status="approximate", to=(run("micro-batches per step"),),
          note="DeepSpeed's train_batch_size is fixed at start-up; its sample counters read the final batch size "
               "during ramp-up (the schedule itself uses the ramped size)", judge=judges.rampup),
    Field("data.min_length", "int", 0, "data.min_length", minimum=0, to=(run("sample filter"),), note=_DATA_NOTE),
    Field("data.min_length_dict", free_form=True, to=(run("per-folder sample filter"),), note=_DATA_NOTE),
    Field("data.train_folder", "str", None, "data.train_folder",
          to=(run("tokenized dataset folder (synthetic data when unset)"),), note=_DATA_NOTE),
    Field("data.valid_folder", "str", None, "data.valid_folder", to=(run("validation dataset folder"),),
          note=_DATA_NOTE),
    Field("data.use_packed_dataset", "bool", True, "data.use_packed_dataset", to=(run("packed (cu_seqlens) batches"),),
          note=_DATA_NOTE),
    Field("data.fixed_random_dataset_seqlen", "bool", True, "data.fixed_random_dataset_seqlen",
          to=(run("synthetic dataset"),), note=_DATA_NOTE),
    Field("data.seed", "int", 1024, "data.seed", to=(arg("--seed"), run("sampler seed")), note=_DATA_NOTE),
    Field("data.num_worker", "int", 4, "data.num_worker", minimum=0, to=(run("data-loader worker processes"),)),
    Field("data.type", "str", "tokenized", to=(run("dataset type"),), note="only 'tokenized' is read"),
    Field("data.empty_cache_and_diag_interval", "int", 50, minimum=0, status="unsupported",
          note="InternEvo's straggler diagnosis is not run"),
    Field("data.diag_outlier_ratio", "float", 1.1, status="unsupported",
          note="InternEvo's straggler diagnosis is not run"),
    Field("data.train_folder_split", status="unsupported", note="not read"),
    # optimizer and schedules
    Field("adam.lr", "float", REQUIRED, "adam.lr", minimum=0.0, to=(ds("optimizer.params.lr"), arg("--lr")),
          note="peak lr of the schedule"),
    Field("adam.adam_beta1", "float", 0.9, "adam.beta1", minimum=0.0, maximum=1.0,
          to=(ds("optimizer.params.betas.0"), arg("--adam-beta1"))),
    Field("adam.adam_beta2", "float", 0.95, "adam.beta2", minimum=0.0, maximum=1.0,
          to=(ds("optimizer.params.betas.1", "beta2_scheduler.init_beta2", "(through beta2_scheduler.init_beta2, "
                                                                             "which defaults to it)"),)),
    Field("adam.adam_beta2_c", "float", 0.0, "adam.beta2_c", judge=judges.beta2_c),
    Field("adam.adam_eps", "float", 1e-8, "adam.eps", minimum=0.0, to=(ds("optimizer.params.eps"), arg("--adam-eps"))),
    Field("adam.weight_decay", "float", 0.01, "adam.weight_decay", minimum=0.0,
          to=(ds("optimizer.params.weight_decay"), arg("--weight-decay")),
          note="applied to every parameter (norms, biases, embeddings), as InternEvo does"),
    Field("lr_scheduler.total_steps", "int", Same("data.total_steps"), "lr_scheduler.total_steps", minimum=1,
          to=(ds("scheduler.params.total_num_steps"), arg("--lr-decay-iters")), judge=judges.lr_schedule),
    Field("lr_scheduler.init_steps", "int", 0, "lr_scheduler.init_steps", minimum=0,
          to=(derived("ds", "scheduler.params.warmup_num_steps", "= max(2, init_steps + warmup steps)"),
              derived("args", "--lr-warmup-iters", "= init_steps + warmup steps")), judge=judges.lr_schedule),
    Field("lr_scheduler.warmup_ratio", "float", 0.0, "lr_scheduler.warmup_ratio", minimum=0.0, maximum=1.0,
          to=(derived("ds", "scheduler.params.warmup_num_steps", "= max(2, init_steps + int(total_steps * ratio))"),
              derived("args", "--lr-warmup-iters", "= init_steps + int(total_steps * ratio)")),
          judge=judges.lr_schedule),
    Field("lr_scheduler.eta_min", "float", 0.0, "lr_scheduler.eta_min", minimum=0.0,
          to=(derived("ds", "scheduler.params.cos_min_ratio", "= eta_min / lr"), arg("--min-lr")),
          judge=judges.lr_schedule),
    Field("lr_scheduler.last_epoch", "int", -1, "lr_scheduler.last_epoch",
          to=(ds("scheduler.params.last_batch_iteration"),)),
    Field("beta2_scheduler.init_beta2", "float", Same("adam.adam_beta2"), "beta2_scheduler.init_beta2", minimum=0.0,
          maximum=1.0, to=(ds("optimizer.params.betas.1"), arg("--adam-beta2")), judge=judges.beta2_c),
    Field("beta2_scheduler.c", "float", Same("adam.adam_beta2_c"), "beta2_scheduler.c", judge=judges.beta2_c),
    Field("beta2_scheduler.cur_iter", "int", -1, "beta2_scheduler.cur_iter",
          note="InternEvo restarts it at every launch too"),
    Field("grad_scaler.fp16", to=(derived("ds", "fp16", _FP16),)),
    Field("grad_scaler.fp16.initial_scale", "float", 2.0**16, "grad_scaler.initial_scale", minimum=0.0,
          to=(derived("ds", "fp16.initial_scale_power", "= log2(initial_scale) " + _FP16),
              arg("--initial-loss-scale", formula=_FP16)), judge=judges.initial_scale),
    Field("grad_scaler.fp16.min_scale", "float", 1.0, "grad_scaler.min_scale", minimum=0.0,
          to=(ds("fp16.min_loss_scale", formula=_FP16), arg("--min-loss-scale", formula=_FP16)),
          judge=judges.fp16_only),
    Field("grad_scaler.fp16.growth_interval", "int", 1000, "grad_scaler.growth_interval", minimum=1,
          to=(ds("fp16.loss_scale_window", formula=_FP16), arg("--loss-scale-window", formula=_FP16)),
          judge=judges.growth),
    Field("grad_scaler.growth_factor", "float", 2.0, "grad_scaler.growth_factor", minimum=1.0, judge=judges.growth),
    Field("grad_scaler.backoff_factor", "float", 0.5, "grad_scaler.backoff_factor", minimum=0.0, maximum=1.0,
          judge=judges.growth),
    Field("grad_scaler.max_scale", "float", 2.0**24, "grad_scaler.max_scale", minimum=0.0, judge=judges.max_scale),
    Field("grad_scaler.hysteresis", "int", 2, "grad_scaler.hysteresis", minimum=1,
          to=(ds("fp16.hysteresis", formula=_FP16 + ", consecutive_hysteresis = false"),
              arg("--hysteresis", formula=_FP16)), judge=judges.fp16_only),
    Field("hybrid_zero_optimizer.overlap_sync_grad", "bool", False, "zero_optimizer.overlap_sync_grad",
          to=(derived("ds", "zero_optimization.overlap_comm", "= false"),), judge=judges.overlap_grad),
    Field("hybrid_zero_optimizer.zero_overlap_communication",
          to=(derived("ds", "zero_optimization.overlap_comm", "= false"),), note="old spelling of overlap_sync_grad",
          judge=judges.overlap_grad),
    Field("hybrid_zero_optimizer.overlap_sync_param", "bool", False, "zero_optimizer.overlap_sync_param",
          judge=judges.overlap_param),
    Field("hybrid_zero_optimizer.reduce_bucket_size", "int", 512 * 1024 * 1024, "zero_optimizer.reduce_bucket_size",
          minimum=1, to=(ds("zero_optimization.reduce_bucket_size"), ds("zero_optimization.allgather_bucket_size")),
          note="both count elements"),
    Field("hybrid_zero_optimizer.clip_grad_norm", "float", 0.0, "zero_optimizer.clip_grad_norm", minimum=0.0,
          to=(ds("gradient_clipping", "applied_clip_grad_norm", "(0 in fp32)"),
              arg("--clip-grad", "applied_clip_grad_norm")), judge=judges.clip),
    Field("loss.label_smoothing", "float", 0.0, "label_smoothing", minimum=0.0, maximum=1.0,
          to=(run("cross-entropy label smoothing"),)),
    Field("loss.moe_loss_coeff", "float", 1.0, note="no MoE models"),
    # options of this adapter, in a section InternEvo does not read
    Field("adapter.clip_grad_in_fp32", "bool", False, "zero_optimizer.clip_in_fp32",
          to=(ds("gradient_clipping", "applied_clip_grad_norm", "= clip_grad_norm in fp32"),),
          judge=judges.clip_option),
    # checkpoints (normalize.py applies InternEvo's rules between them)
    Field("ckpt.enable_save_ckpt", "bool", True, "ckpt.enable_save_ckpt", to=(run("save checkpoints"),),
          note=_CKPT_NOTE),
    Field("ckpt.save_ckpt_folder", "str", None, "ckpt.save_ckpt_folder",
          to=(run("checkpoint folder (local: or boto3:)"),), note=_CKPT_NOTE),
    Field("ckpt.load_ckpt_folder", "str", None, "ckpt.load_ckpt_folder", to=(run("resume everything"),),
          note=_CKPT_NOTE),
    Field("ckpt.load_model_only_folder", "str", None, "ckpt.load_model_only_folder",
          to=(run("initialise weights only"),), note=_CKPT_NOTE),
    Field("ckpt.load_optimizer", "bool", True, "ckpt.load_optimizer", to=(run("resume optimizer state"),),
          note=_CKPT_NOTE),
    Field("ckpt.load_given_ckpt", "any", False, to=(run("legacy resume switch"),), note=_CKPT_NOTE),
    Field("ckpt.load_ckpt_info", "any", None, "ckpt.load_ckpt_info", free_form=True,
          to=(run("what to load from where"),), note=_CKPT_NOTE),
    Field("ckpt.checkpoint_every", "count", None, "ckpt.checkpoint_every", minimum=1, to=(run("save interval"),),
          note=_CKPT_NOTE),
    Field("ckpt.async_upload", "bool", False, "ckpt.async_upload", to=(run("async upload"),),
          judge=judges.async_upload),
    Field("ckpt.async_upload_tmp_folder", "str", "/dev/shm/internlm_tmp_ckpt/", "ckpt.async_upload_tmp_folder",
          nullable=True, to=(run("async upload staging folder"),), judge=judges.async_upload),
    Field("ckpt.snapshot_ckpt_folder", "str", None, "ckpt.snapshot_ckpt_folder",
          to=(run("snapshot folder (two alternating slots)"),), note=_CKPT_NOTE),
    Field("ckpt.oss_snapshot_freq", "count", None, "ckpt.oss_snapshot_freq", minimum=0,
          to=(run("snapshot interval"),), note=_CKPT_NOTE),
    Field("ckpt.auto_resume", "bool", True, "ckpt.auto_resume",
          to=(run("resume from the newest complete checkpoint"),), note=_CKPT_NOTE),
    Field("ckpt.stop_file_path", "str", None, "ckpt.stop_file_path", to=(run("stop file asking for a save"),),
          note=_CKPT_NOTE),
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


BY_PATH = {f.path: f for f in FIELDS}
TOP_LEVEL_KEYS = frozenset(p for p in BY_PATH if "." not in p)
#: Dotted prefixes that hold other keys (``model``, ``parallel.zero1``, ``grad_scaler.fp16`` ...).
_SECTIONS = frozenset(p.rsplit(".", 1)[0] for p in BY_PATH if "." in p)
#: Top-level sections that must be present: those holding a key InternEvo cannot run without.
REQUIRED_SECTIONS = tuple(sorted({f.path.split(".")[0] for f in FIELDS if f.default is REQUIRED and "." in f.path}))
SECTIONS = tuple(sorted(p for p in _SECTIONS if "." not in p))
ADAPTER_SECTION = "adapter"
"""Options of this adapter: InternEvo has no default for them to report."""


def field_for(path: str) -> Field | None:
    """The row for a dotted leaf path, falling back to its nearest free-form ancestor."""
    while path:
        if path in BY_PATH:
            return BY_PATH[path]
        path = path.rsplit(".", 1)[0] if "." in path else ""
    return None


def is_known(path: str) -> bool:
    return path in BY_PATH or path in _SECTIONS


def is_free_form(path: str) -> bool:
    row = field_for(path)
    return row is not None and row.free_form


def has_children(path: str) -> bool:
    return path in _SECTIONS


def known_children(prefix: str) -> list[str]:
    """Names of the known keys directly under ``prefix`` (``""`` for the top level)."""
    names = set()
    for path in list(BY_PATH) + list(_SECTIONS):
        if prefix:
            if path.startswith(prefix + ".") and "." not in path[len(prefix) + 1:]:
                names.add(path[len(prefix) + 1:])
        elif "." not in path:
            names.add(path)
    return sorted(names)
