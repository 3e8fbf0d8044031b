"""Cross-field checks, and the parallel plan they produce.

``normalize`` checks each field on its own; this module checks how fields fit together: head and
hidden sizes against the tensor size, layers against the pipeline partition, micro-batches against
the interleaved schedule, the world size against tp × pp and zero1. It also refuses ``isp``, which
megatron-core cannot reproduce, because a silently different run is worse than an error (single-field refusals,
no SwiGLU and the like, are the field table's ``requires``). Each rule raises ``ConfigError`` with the field,
the values and what would be valid.
"""

from __future__ import annotations

from adapter.config.errors import ConfigError
from adapter.config.schema import InternLMConfig
from adapter.runtime.layout import ParallelLayout, partition_uniform


def validate(cfg: InternLMConfig, world_size: int | None = None) -> ParallelLayout:
    """Check ``cfg`` as a whole and return its parallel layout.

    Args:
        cfg: a normalised config.
        world_size: total number of processes, when known; enables the data-parallel checks.

    Raises:
        ConfigError: naming the field (and file:line) of the first inconsistency found.
    """
    m, p, d = cfg.model, cfg.parallel, cfg.data
    tp, pp, chunks = p.tensor_size, p.pipeline_size, m.num_chunks

    if p.tensor_mode == "isp":
        raise cfg.error("parallel.tensor.mode", "'isp' (InternEvo's all-to-all sequence parallelism with weight "
                        "parallelism) has no megatron-core equivalent; use mode='msp' (Megatron tensor + sequence "
                        "parallelism) instead")

    if m.hidden_size % m.num_attention_heads:
        raise cfg.error("model.hidden_size", f"{m.hidden_size} is not divisible by model.num_attention_heads "
                        f"({m.num_attention_heads})")
    if m.num_attention_heads % m.num_kv_attention_heads:
        raise cfg.error("model.num_kv_attention_heads", f"model.num_attention_heads ({m.num_attention_heads}) must "
                        f"be a multiple of num_kv_attention_heads ({m.num_kv_attention_heads})")
    tensor_path = "parallel.tensor.size" if "parallel.tensor.size" in cfg.given else "parallel.tensor"
    for name, value in (("model.num_attention_heads", m.num_attention_heads),
                        ("model.num_kv_attention_heads", m.num_kv_attention_heads),
                        ("model.hidden_size", m.hidden_size),
                        ("model.mlp_ratio", m.ffn_hidden_size)):
        if value % tp:
            what = f"the MLP width {value}" if name == "model.mlp_ratio" else f"{name.split('.')[-1]} ({value})"
            raise cfg.error(tensor_path, f"tensor size {tp} must divide {what}")
    if m.vocab_size % tp:
        raise cfg.error("model.vocab_size", f"{m.vocab_size} is not divisible by tensor size {tp}: megatron-core's "
                        "vocab-parallel embedding and head need equal shards (InternEvo allows an uneven head split)")

    if chunks > 1 and pp == 1:
        raise cfg.error("model.num_chunks", f"{chunks} virtual chunks need pipeline parallelism "
                        "(parallel.pipeline.size > 1)")
    if chunks > 1 and not p.interleaved_overlap:
        raise cfg.error("parallel.pipeline.interleaved_overlap", f"model.num_chunks={chunks} (interleaved "
                        "pipeline) requires parallel.pipeline = dict(size=..., interleaved_overlap=True), as in "
                        "InternEvo")
    try:
        stages = partition_uniform(m.num_layers, pp, chunks)
    except ConfigError as exc:
        raise cfg.error(exc.field, exc.message) from None
    if chunks > 1 and d.micro_num % pp:
        raise cfg.error("data.micro_num", f"{d.micro_num} micro-batches must be a multiple of the pipeline size "
                        f"({pp}) for the interleaved schedule")
    if d.rampup_batch_size is not None and pp > 1:
        start, incr, _ = d.rampup_batch_size
        unit = d.micro_bsz
        if start % unit or incr % unit or (d.micro_num - start) % unit:
            raise cfg.error("data.rampup_batch_size", f"with pipeline parallelism, start ({start}), increment "
                            f"({incr}) and micro_num - start ({d.micro_num - start}) must be multiples of "
                            f"micro_bsz ({unit})")
        if chunks > 1 and (start % pp or incr % pp):
            raise cfg.error("data.rampup_batch_size", f"with the interleaved schedule every ramp-up size must be a "
                            f"multiple of the pipeline size ({pp}); got start {start}, increment {incr}")
    sequence_parallel = p.sequence_parallel and tp > 1
    if sequence_parallel and d.packed_length % tp:
        raise cfg.error("data.seq_len", f"sequence parallelism splits each micro-batch of {d.packed_length} tokens "
                        f"(seq_len × micro_bsz) over tensor size {tp}; it must divide evenly")

    dp = zero1 = None
    if world_size is not None:
        if world_size < 1 or world_size % (tp * pp):
            raise ConfigError("world_size", f"{world_size} processes cannot be split into tensor ({tp}) × pipeline "
                              f"({pp}) groups; use a multiple of {tp * pp}")
        dp = world_size // (tp * pp)
        zero1 = dp if p.zero1_size <= 0 else p.zero1_size
        if zero1 > dp or dp % zero1:
            path = "parallel.zero1.size" if "parallel.zero1.size" in cfg.given else "parallel.zero1"
            raise cfg.error(path, f"zero1={p.zero1_size} must divide the data-parallel size {dp} "
                            f"(= world {world_size} / (tensor {tp} × pipeline {pp}))")
    return ParallelLayout(
        tp=tp,
        pp=pp,
        vpp=chunks,
        dp=dp,
        zero1=zero1,
        sequence_parallel=sequence_parallel,
        stages=tuple(tuple(stage) for stage in stages),
    )
