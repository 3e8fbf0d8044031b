"""Turn a loaded InternEvo config into ``schema.InternLMConfig``.

This is InternEvo 0.5.2's ``args_sanity_check`` (``initialize/launch.py``) rewritten as a pure function:
the same defaults for absent keys and the same collapsing of variant forms, plus strict type checks.
Each problem raises ``ConfigError`` naming the dotted field and the file:line where it is written.
Unknown keys are refused with a did-you-mean, because a misspelt key silently falls back to a
default in InternEvo.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

from adapter.config import fields
from adapter.config.errors import ConfigError
from adapter.config.load import RawConfig
from adapter.config.schema import (
    MODEL_TYPES,
    AdamConfig,
    Beta2SchedulerConfig,
    CkptConfig,
    DataConfig,
    GradScalerConfig,
    InternLMConfig,
    LRSchedulerConfig,
    ModelConfig,
    ParallelConfig,
    ZeroOptimizerConfig,
)

_MISSING = object()

#: InternEvo's accepted dtype strings (``launch.py:267-288``) → (dtype, tf32).
DTYPES = {
    "torch.bfloat16": ("bf16", False),
    "torch.float16": ("fp16", False),
    "torch.half": ("fp16", False),
    "torch.float32": ("fp32", False),
    "torch.tf32": ("fp32", True),
}


def ffn_hidden_size(hidden_size: int, mlp_ratio: float, multiple_of: int = 256) -> int:
    """InternEvo's FeedForward width: ``multiple_of * ceil(int(H * mlp_ratio) / multiple_of)``.

    >>> ffn_hidden_size(4096, 8 / 3), ffn_hidden_size(6144, 8 / 3), ffn_hidden_size(4096, 3.5)
    (11008, 16384, 14336)
    """
    return multiple_of * math.ceil(int(hidden_size * mlp_ratio) / multiple_of)


class _Reader:
    """Typed access to dotted paths of the raw config, recording what was given and what defaulted."""

    def __init__(self, raw: RawConfig):
        self.raw = raw
        self.yaml = raw.source.endswith((".yaml", ".yml"))
        self.given: dict[str, Any] = {}
        self.defaulted: dict[str, Any] = {}

    def error(self, path: str, message: str) -> ConfigError:
        return self.raw.error(path, message)

    def lookup(self, path: str) -> Any:
        node: Any = self.raw.values
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return _MISSING
            node = node[part]
        return node

    def section(self, name: str, *, required: bool = False) -> dict:
        value = self.lookup(name)
        if value is _MISSING or value is None:
            if required:
                raise self.error(name, f"the `{name}` section is required")
            return {}
        if not isinstance(value, dict):
            raise self.error(name, f"must be a dict, got {type(value).__name__} {value!r}")
        return value

    def _get(self, path: str, default: Any, required: bool) -> tuple[Any, bool]:
        value = self.lookup(path)
        if value is _MISSING:
            if required:
                raise self.error(path, "is required")
            self.defaulted[path] = default
            return default, False
        self.given[path] = value
        return value, True

    def int(self, path: str, default: Any = None, *, required: bool = False, minimum: int | None = None,
            allow_none: bool = False, allow_inf: bool = False) -> int | None:
        value, _ = self._get(path, default, required)
        if value is None and (allow_none or (default is None and not required)):
            return None
        if allow_inf and isinstance(value, float) and math.isinf(value) and value > 0:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(path, f"must be an integer, got {type(value).__name__} {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(path, f"must be >= {minimum}, got {value}")
        return value

    def float(self, path: str, default: Any = None, *, required: bool = False, minimum: float | None = None,
              maximum: float | None = None) -> float:
        value, _ = self._get(path, default, required)
        if self.yaml and isinstance(value, str):
            try:  # PyYAML reads ``1e-5`` (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(path, f"must be a number, got {type(value).__name__} {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise self.error(path, f"must be a finite number, got {value}")
        if minimum is not None and value < minimum:
            raise self.error(path, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(path, f"must be <= {maximum}, got {value}")
        return value

    def bool(self, path: str, default: bool, *, required: bool = False) -> bool:
        value, _ = self._get(path, default, required)
        if not isinstance(value, bool):
            raise self.error(path, f"must be True or False, got {type(value).__name__} {value!r}")
        return value

    def str(self, path: str, default: Any = None, *, required: bool = False, choices: tuple[str, ...] = (),
            allow_none: bool = True) -> str | None:
        value, _ = self._get(path, default, required)
        if value is None and allow_none:
            return None
        if not isinstance(value, str):
            raise self.error(path, f"must be a string, got {type(value).__name__} {value!r}")
        if choices and value not in choices:
            raise self.error(path, f"must be one of {', '.join(map(repr, choices))}, got {value!r}{_suggest(value, choices)}")
        return value

    def any(self, path: str, default: Any = None) -> Any:
        value, _ = self._get(path, default, False)
        return value


def _suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def normalize(raw: RawConfig) -> InternLMConfig:
    """Normalise a loaded config. Raises ``ConfigError`` on the first problem found."""
    _check_known_keys(raw)
    r = _Reader(raw)
    for name in ("model", "data", "parallel", "adam", "lr_scheduler", "beta2_scheduler", "grad_scaler",
                 "hybrid_zero_optimizer", "loss", "ckpt", "monitor", "adapter"):
        r.section(name, required=name in ("model", "data", "adam"))

    parallel = _parallel(r)
    model = _model(r)
    data = _data(r, parallel)
    adam = AdamConfig(
        lr=r.float("adam.lr", required=True, minimum=0.0),
        beta1=r.float("adam.adam_beta1", 0.9, minimum=0.0, maximum=1.0),
        beta2=r.float("adam.adam_beta2", 0.95, minimum=0.0, maximum=1.0),
        beta2_c=r.float("adam.adam_beta2_c", 0.0),
        eps=r.float("adam.adam_eps", 1e-8, minimum=0.0),
        weight_decay=r.float("adam.weight_decay", 0.01, minimum=0.0),
    )
    lr = LRSchedulerConfig(
        total_steps=r.int("lr_scheduler.total_steps", data.total_steps, minimum=1),
        init_steps=r.int("lr_scheduler.init_steps", 0, minimum=0),
        warmup_ratio=r.float("lr_scheduler.warmup_ratio", 0.0, minimum=0.0, maximum=1.0),
        eta_min=r.float("lr_scheduler.eta_min", 0.0, minimum=0.0),
        last_epoch=r.int("lr_scheduler.last_epoch", -1),
    )
    beta2 = Beta2SchedulerConfig(
        init_beta2=r.float("beta2_scheduler.init_beta2", adam.beta2, minimum=0.0, maximum=1.0),
        c=r.float("beta2_scheduler.c", adam.beta2_c),
        cur_iter=r.int("beta2_scheduler.cur_iter", -1),
    )
    scaler = GradScalerConfig(
        initial_scale=r.float("grad_scaler.fp16.initial_scale", 2.0**16, minimum=0.0),
        min_scale=r.float("grad_scaler.fp16.min_scale", 1.0, minimum=0.0),
        growth_interval=r.int("grad_scaler.fp16.growth_interval", 1000, minimum=1),
        growth_factor=r.float("grad_scaler.growth_factor", 2.0, minimum=1.0),
        backoff_factor=r.float("grad_scaler.backoff_factor", 0.5, minimum=0.0, maximum=1.0),
        max_scale=r.float("grad_scaler.max_scale", 2.0**24, minimum=0.0),
        hysteresis=r.int("grad_scaler.hysteresis", 2, minimum=1),
    )
    if scaler.min_scale > scaler.initial_scale or scaler.initial_scale > scaler.max_scale:
        raise r.error("grad_scaler.fp16.initial_scale",
                      f"must lie between min_scale ({scaler.min_scale:g}) and max_scale ({scaler.max_scale:g}), "
                      f"got {scaler.initial_scale:g}")
    overlap_alias = r.lookup("hybrid_zero_optimizer.zero_overlap_communication")
    if overlap_alias is not _MISSING:
        r.given["hybrid_zero_optimizer.zero_overlap_communication"] = overlap_alias
    zero_opt = ZeroOptimizerConfig(
        overlap_sync_grad=r.bool("hybrid_zero_optimizer.overlap_sync_grad",
                                 overlap_alias if isinstance(overlap_alias, bool) else False),
        overlap_sync_param=r.bool("hybrid_zero_optimizer.overlap_sync_param", False),
        reduce_bucket_size=r.int("hybrid_zero_optimizer.reduce_bucket_size", 512 * 1024 * 1024, minimum=1),
        clip_grad_norm=r.float("hybrid_zero_optimizer.clip_grad_norm", 0.0, minimum=0.0),
        clip_in_fp32=r.bool("adapter.clip_grad_in_fp32", False),
    )
    r.defaulted.pop("adapter.clip_grad_in_fp32", None)  # our option, not InternEvo's: no InternEvo default to report
    label_smoothing = r.float("loss.label_smoothing", 0.0, minimum=0.0, maximum=1.0)
    r.float("loss.moe_loss_coeff", 1.0)

    ckpt = _ckpt(r, data)
    r.any("monitor")  # alerting/light-monitor: recorded for the report only
    cfg = InternLMConfig(
        source=raw.source,
        job_name=r.str("JOB_NAME", "AnonymousJob", allow_none=False),
        model=model,
        parallel=parallel,
        data=data,
        adam=adam,
        lr_scheduler=lr,
        beta2_scheduler=beta2,
        grad_scaler=scaler,
        zero_optimizer=zero_opt,
        label_smoothing=label_smoothing,
        ckpt=ckpt,
        cudnn_deterministic=r.bool("cudnn_deterministic", False),
        cudnn_benchmark=r.bool("cudnn_benchmark", False),
        enable_tb=r.bool("enable_tb", True),
        tensorboard_folder=r.str("tensorboard_folder", None),
        given=_leaves(r.given),
        defaulted=r.defaulted,
        lines=raw.lines,
    )
    for path in ("resume_tb_folder", "alert_address", "DO_ALERT", "metric_dtype", "gradient_handler", "only_load_lr",
                 "output_tf32", "moe"):
        if r.lookup(path) is not _MISSING:
            cfg.given[path] = r.lookup(path)
    return cfg


def normalize_model(model_type: str, model: dict[str, Any], source: str) -> ModelConfig:
    """Just the ``model`` section (as InternEvo stores it in ``model_config.pt``, dtype object included)."""
    values = dict(model)
    if not isinstance(values.get("dtype", ""), str):
        values["dtype"] = str(values["dtype"])  # torch.bfloat16 -> "torch.bfloat16"
    return _model(_Reader(RawConfig({"model_type": model_type, "model": values}, source, {})))


def _leaves(given: dict[str, Any]) -> dict[str, Any]:
    """Expand dict values (``monitor``, ``load_ckpt_info``) into dotted leaves for the report."""
    out: dict[str, Any] = {}
    for path, value in given.items():
        if isinstance(value, dict) and value:
            for k, v in _leaves({f"{path}.{k}": v for k, v in value.items()}).items():
                out[k] = v
        else:
            out[path] = value
    return out


def _check_known_keys(raw: RawConfig) -> None:
    """Refuse keys InternEvo does not know; ALL-CAPS top-level names are helper variables."""

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if not prefix and (key.isupper() or key.startswith("_")) and key not in fields.TOP_LEVEL_KEYS:
                continue
            if not isinstance(key, str):
                raise raw.error(prefix.rstrip("."), f"keys must be strings, got {key!r}")
            if fields.is_free_form(path):
                continue
            if not fields.is_known(path):
                siblings = fields.known_children(prefix.rstrip("."))
                raise raw.error(path, f"unknown key `{key}`{_suggest(key, siblings)}")
            if isinstance(value, dict) and fields.has_children(path):
                walk(value, path + ".")

    walk(raw.values, "")


def _parallel(r: _Reader) -> ParallelConfig:
    zero1 = r.lookup("parallel.zero1")
    if isinstance(zero1, dict):
        zero1_size = r.int("parallel.zero1.size", -1)
        fsdp = r.bool("parallel.zero1.fsdp", False)
    else:
        zero1_size = r.int("parallel.zero1", -1)
        fsdp = False

    tensor = r.lookup("parallel.tensor")
    legacy_sp = r.lookup("parallel.sequence_parallel")
    if legacy_sp is not _MISSING:
        r.bool("parallel.sequence_parallel", False)
    if isinstance(tensor, dict):
        tensor_size = r.int("parallel.tensor.size", 1, minimum=1)
        mode = r.str("parallel.tensor.mode", "mtp", choices=("mtp", "msp", "fsp", "isp"), allow_none=False)
        mode_given = "parallel.tensor.mode" in r.given
    else:
        tensor_size = r.int("parallel.tensor", 1, minimum=1)
        mode, mode_given = "mtp", False
    if not mode_given and legacy_sp is True:
        # Old configs (InternLM 2023) spelled Megatron sequence parallelism as a top-level flag next to an
        # int tensor size; keep that meaning (0.5.2 would silently force it off with the implied "mtp").
        mode = "msp"
    sequence_parallel = mode in ("msp", "fsp", "isp")

    pipeline = r.lookup("parallel.pipeline")
    if isinstance(pipeline, dict):
        pipeline_size = r.int("parallel.pipeline.size", 1, minimum=1)
        interleaved_overlap = r.bool("parallel.pipeline.interleaved_overlap", False)
    else:
        pipeline_size = r.int("parallel.pipeline", 1, minimum=1)
        interleaved_overlap = False
        r.defaulted["parallel.pipeline.interleaved_overlap"] = False

    weight = r.lookup("parallel.weight")
    if isinstance(weight, dict):
        weight_size = r.int("parallel.weight.size", 1, minimum=1)
        r.bool("parallel.weight.overlap", False)
        r.bool("parallel.weight.memory_pool", False)
    else:
        weight_size = r.int("parallel.weight", 1, minimum=1)
    if weight_size > 1 and mode != "isp":
        raise r.error("parallel.weight.size", f"weight parallel ({weight_size}) is only supported with tensor mode 'isp'")
    if fsdp and pipeline_size > 1:
        raise r.error("parallel.zero1.fsdp", "FSDP is not supported with pipeline size > 1 (InternEvo refuses it too)")
    return ParallelConfig(
        tensor_size=tensor_size,
        tensor_mode=mode,  # type: ignore[arg-type]
        sequence_parallel=sequence_parallel,
        pipeline_size=pipeline_size,
        interleaved_overlap=interleaved_overlap,
        zero1_size=zero1_size,
        fsdp=fsdp,
        weight_size=weight_size,
    )


def _model(r: _Reader) -> ModelConfig:
    model_type = r.str("model_type", "INTERNLM", allow_none=False)
    if model_type not in MODEL_TYPES:
        raise r.error("model_type", f"unsupported model_type {model_type!r}; supported: "
                      f"{', '.join(MODEL_TYPES)}{_suggest(model_type, MODEL_TYPES)}")
    family = MODEL_TYPES[model_type]
    num_layers = r.int("model.num_layers", required=True, minimum=1)
    hidden = r.int("model.hidden_size", required=True, minimum=1)
    heads = r.int("model.num_attention_heads", required=True, minimum=1)
    if family == "internlm2":
        kv_heads = r.int("model.num_kv_attention_heads", heads, minimum=1)
    elif r.lookup("model.num_kv_attention_heads") is not _MISSING:
        raise r.error("model.num_kv_attention_heads", "InternLM1 (model_type 'INTERNLM') has no grouped-query "
                      "attention; use model_type='INTERNLM2_PUBLIC' for GQA")
    else:
        kv_heads = heads
    vocab = r.int("model.vocab_size", required=True, minimum=1)
    mlp_ratio = r.float("model.mlp_ratio", 4.0, minimum=0.0)
    multiple_of = r.int("model.multiple_of", 256, minimum=1)
    if int(hidden * mlp_ratio) < 1:
        raise r.error("model.mlp_ratio", f"gives an empty MLP (hidden_size {hidden} × {mlp_ratio})")
    dtype_str = r.any("model.dtype", "torch.float16")
    if not isinstance(dtype_str, str) or dtype_str not in DTYPES:
        raise r.error("model.dtype", f"must be one of {', '.join(map(repr, DTYPES))}, got {dtype_str!r}"
                      f"{_suggest(dtype_str, DTYPES)}")
    dtype, tf32 = DTYPES[dtype_str]
    ckpt = r.any("model.checkpoint", False)
    if isinstance(ckpt, bool):
        checkpoint = 1.0 if ckpt else 0.0
    elif isinstance(ckpt, (int, float)) and 0 <= ckpt <= 1:
        checkpoint = float(ckpt)
    else:
        raise r.error("model.checkpoint", f"must be True, False or a fraction in [0, 1], got {ckpt!r}")
    adapt_hf = r.lookup("model.adapt_hf")
    qk_interleaved_given = r.lookup("model.qk_interleaved")
    if adapt_hf is not _MISSING:
        r.bool("model.adapt_hf", True)
    qk_default = (not adapt_hf) if isinstance(adapt_hf, bool) else False
    qk_interleaved = r.bool("model.qk_interleaved", qk_default)
    if isinstance(adapt_hf, bool) and qk_interleaved_given is not _MISSING and qk_interleaved == adapt_hf:
        raise r.error("model.qk_interleaved", "contradicts model.adapt_hf (qk_interleaved must equal not adapt_hf)")
    no_bias = r.bool("model.no_bias", False)
    if family == "internlm1" and "model.no_bias" in r.given and no_bias:
        raise r.error("model.no_bias", "InternLM1 always has qkv and output-projection biases; no_bias=True "
                      "is only meaningful for InternLM2")
    norm_type = r.str("model.norm_type", "rmsnorm", allow_none=False)
    # read the remaining model keys so that they are type-checked and reported
    for path in ("model.embed_split_hidden", "model.apply_post_layer_norm",
                 "model.is_reward", "model.dropout_selective_checkpoint", "model.use_scaled_init",
                 "model.use_swiglu", "model.deepnorm", "model.norm_head", "model.mlp_layer_fusion"):
        r.bool(path, fields.MODEL_BOOL_DEFAULTS[path])
    for path in ("model.embedding_init_std", "model.attn_wqkv_init_std", "model.attn_other_init_std",
                 "model.ffn_uplayer_init_std", "model.ffn_other_init_std", "model.out_head_init_std"):
        r.float(path, 0.02, minimum=0.0)
    r.str("model.init_type", "normal", allow_none=False)
    r.int("model.num_experts", 1, minimum=1)
    r.str("model.moe_type", "GShard", allow_none=False)
    r.bool("model.moe_use_residual", False)
    return ModelConfig(
        model_type=model_type,
        family=family,
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_attention_heads=kv_heads,
        vocab_size=vocab,
        mlp_ratio=mlp_ratio,
        ffn_hidden_size=ffn_hidden_size(hidden, mlp_ratio, multiple_of),
        multiple_of=multiple_of,
        norm_type="rmsnorm" if norm_type == "rmsnorm" else "layernorm",
        layer_norm_epsilon=r.float("model.layer_norm_epsilon", 1e-5, minimum=0.0),
        dtype=dtype,  # type: ignore[arg-type]
        tf32=tf32,
        checkpoint=checkpoint,
        num_chunks=r.int("model.num_chunks", 1, minimum=1),
        use_flash_attn=r.bool("model.use_flash_attn", True),
        rope_base=r.float("model.rope_base", 10000.0, minimum=1.0),
        qk_interleaved=qk_interleaved,
        no_bias=no_bias,
        embed_grad_scale=r.float("model.embed_grad_scale", 1.0, minimum=0.0),
        parallel_output=r.bool("model.parallel_output", True),
        use_dynamic_ntk_rope=r.bool("model.use_dynamic_ntk_rope", False),
        max_position_embeddings=r.int("model.max_position_embeddings", 2048, minimum=1),
        use_fp32_norm=r.bool("use_fp32_norm", False),
        drop_rate=r.float("model.drop_rate", 0.0, minimum=0.0, maximum=1.0),
        attn_drop_rate=r.float("model.attn_drop_rate", 0.0, minimum=0.0, maximum=1.0),
        residual_in_fp32=r.bool("model.residual_in_fp32", False),
    )


def _parse_rampup(r: _Reader) -> tuple[int, int, int] | None:
    value = r.any("data.rampup_batch_size", "")
    if value in ("", None):
        return None
    parts = value.split() if isinstance(value, str) else None
    if not parts or len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise r.error("data.rampup_batch_size",
                      f"must be '' or three space-separated integers 'start increment every', got {value!r}")
    start, incr, every = (int(p) for p in parts)
    if start < 1 or every < 1:
        raise r.error("data.rampup_batch_size", f"start and every must be >= 1, got {value!r}")
    return start, incr, every


def _parse_skip(r: _Reader) -> tuple[tuple[int, int], ...]:
    value = r.any("data.skip_batches", "")
    if value in ("", None):
        return ()
    if not isinstance(value, str):
        raise r.error("data.skip_batches", f"must be a string like '100-200,350', got {value!r}")
    ranges = []
    for piece in value.split(","):
        piece = piece.strip()
        bounds = piece.split("-")
        if not piece or len(bounds) > 2 or not all(b.strip().isdigit() for b in bounds):
            raise r.error("data.skip_batches", f"cannot read {piece!r} in {value!r}; use ranges like '100-200,350'")
        lo, hi = int(bounds[0]), int(bounds[-1])
        if hi < lo:
            raise r.error("data.skip_batches", f"range {piece!r} ends before it starts")
        ranges.append((lo, hi))
    return tuple(ranges)


def _data(r: _Reader, parallel: ParallelConfig) -> DataConfig:
    seq_len = r.int("data.seq_len", required=True, minimum=1)
    micro_bsz = r.int("data.micro_bsz", required=True, minimum=1)
    micro_num = r.int("data.micro_num", 1, minimum=1)
    if r.lookup("data.packed_length") is not _MISSING:
        r.any("data.packed_length")  # InternEvo ignores it and sets seq_len * micro_bsz
    grad_acc = r.int("data.gradient_accumulation", micro_num, minimum=1)
    if parallel.pipeline_size == 1 and grad_acc != micro_num:
        raise r.error("data.gradient_accumulation",
                      f"must equal data.micro_num ({micro_num}) without pipeline parallelism, got {grad_acc}")
    rampup = _parse_rampup(r)
    skip = _parse_skip(r)
    for path in ("data.empty_cache_and_diag_interval",):
        r.int(path, 50, minimum=0)
    r.float("data.diag_outlier_ratio", 1.1)
    r.str("data.type", "tokenized", allow_none=False)
    r.int("data.num_worker", 4, minimum=0)
    for path in ("data.min_length_dict", "data.train_folder_split"):
        if r.lookup(path) is not _MISSING:
            r.any(path)
    return DataConfig(
        seq_len=seq_len,
        micro_num=micro_num,
        micro_bsz=micro_bsz,
        gradient_accumulation=grad_acc,
        valid_micro_num=r.int("data.valid_micro_num", micro_num, minimum=0),
        valid_every=r.int("data.valid_every", 0, minimum=0),
        pack_sample_into_one=r.bool("data.pack_sample_into_one", False),
        total_steps=r.int("data.total_steps", required=True, minimum=1),
        skip_batches=skip,
        rampup_batch_size=rampup,
        min_length=r.int("data.min_length", 0, minimum=0),
        train_folder=r.str("data.train_folder", None),
        valid_folder=r.str("data.valid_folder", None),
        use_packed_dataset=r.bool("data.use_packed_dataset", True),
        fixed_random_dataset_seqlen=r.bool("data.fixed_random_dataset_seqlen", True),
        seed=r.int("data.seed", 1024),
    )


def _ckpt(r: _Reader, data: DataConfig) -> CkptConfig:
    # Read every key first so each one is type-checked and reported, then apply InternEvo's rules.
    enable = r.bool("ckpt.enable_save_ckpt", True)
    save = r.str("ckpt.save_ckpt_folder", None)
    every = r.int("ckpt.checkpoint_every", None, allow_none=True, allow_inf=True, minimum=1)
    async_upload = r.bool("ckpt.async_upload", False)
    tmp_folder = r.str("ckpt.async_upload_tmp_folder", "/dev/shm/internlm_tmp_ckpt/")
    snapshot = r.str("ckpt.snapshot_ckpt_folder", None)
    snapshot_freq = r.int("ckpt.oss_snapshot_freq", None, allow_none=True, allow_inf=True, minimum=0)
    load_info = r.any("ckpt.load_ckpt_info", None)
    r.any("ckpt.load_given_ckpt", False)
    if enable and every is None:
        raise r.error("ckpt.checkpoint_every", "is required when ckpt.enable_save_ckpt is True")
    if enable and not save:
        raise r.error("ckpt.save_ckpt_folder", "is required when ckpt.enable_save_ckpt is True")
    # InternEvo: "Storing ckpt on file system does not support asynchronous storage, will use sync save!"
    async_upload = async_upload and enable and (save or "").startswith(("boto3:", "volc:", "oss2:", "s3://"))
    if snapshot is None and save:
        snapshot = save.rstrip("/") + "/snapshot"
    if load_info is not None:
        if not isinstance(load_info, dict) or not isinstance(load_info.get("path"), str):
            raise r.error("ckpt.load_ckpt_info", "must be dict(path=..., content=(...), ckpt_type=...)")
        ckpt_type = load_info.get("ckpt_type", "internevo")
        if ckpt_type not in ("internevo", "llama", "hf_llama", "internlm_test"):
            raise r.error("ckpt.load_ckpt_info.ckpt_type", f"unknown ckpt_type {ckpt_type!r}; InternEvo knows "
                          "'internevo', 'llama', 'hf_llama', 'internlm_test'")
    return CkptConfig(
        enable_save_ckpt=enable,
        save_ckpt_folder=save if enable else None,
        load_ckpt_folder=r.str("ckpt.load_ckpt_folder", None),
        load_model_only_folder=r.str("ckpt.load_model_only_folder", None),
        load_optimizer=r.bool("ckpt.load_optimizer", True),
        checkpoint_every=every if enable else None,
        async_upload=async_upload,
        async_upload_tmp_folder=tmp_folder if async_upload else None,
        snapshot_ckpt_folder=snapshot if enable else None,
        # InternEvo snapshots only when oss_snapshot_freq > 1
        oss_snapshot_freq=snapshot_freq if enable and snapshot_freq is not None and snapshot_freq > 1 else None,
        auto_resume=r.bool("ckpt.auto_resume", True),
        stop_file_path=r.str("ckpt.stop_file_path", None),
        load_ckpt_info=load_info,
    )
