"""InternEvo config → the equivalent Megatron-LM ``pretrain_gpt.py`` arguments (torch-free).

For users who move on to Megatron-LM itself. The text lists one argument per line (so it can be
pasted after ``pretrain_gpt.py`` with line continuations, or read with ``xargs``); ``#`` lines say what
Megatron-LM cannot express.
"""

from __future__ import annotations

from adapter.config.schema import InternLMConfig
from adapter.runtime.layout import ParallelLayout


def megatron_args(cfg: InternLMConfig, layout: ParallelLayout) -> list[str]:
    """Arguments (``--flag`` or ``--flag value``) in the order Megatron-LM's help lists their groups."""
    m, d, a, lr, gs = cfg.model, cfg.data, cfg.adam, cfg.lr_scheduler, cfg.grad_scaler
    args = [
        f"--num-layers {m.num_layers}",
        f"--hidden-size {m.hidden_size}",
        f"--ffn-hidden-size {m.ffn_hidden_size}",
        f"--num-attention-heads {m.num_attention_heads}",
        f"--kv-channels {m.head_dim}",
    ]
    if m.num_kv_attention_heads != m.num_attention_heads:
        args += ["--group-query-attention", f"--num-query-groups {m.num_kv_attention_heads}"]
    args += [
        f"--seq-length {d.seq_len}",
        f"--max-position-embeddings {d.seq_len}",
        "--position-embedding-type rope",
        f"--rotary-base {_num(m.rope_base)}",
        f"--normalization {'RMSNorm' if m.norm_type == 'rmsnorm' else 'LayerNorm'}",
        f"--norm-epsilon {_num(m.layer_norm_epsilon)}",
        "--swiglu",
        "--disable-bias-linear",
        "--untie-embeddings-and-output-weights",
        f"--attention-dropout {_num(m.attn_drop_rate)}",
        f"--hidden-dropout {_num(m.drop_rate)}",
        f"--vocab-size {m.vocab_size}",
        "--make-vocab-size-divisible-by 1",
    ]
    if m.qkv_bias:
        args.append("--add-qkv-bias")
    if m.qk_interleaved:
        args.append("--rotary-interleaved")
    if m.residual_in_fp32:
        args.append("--fp32-residual-connection")
    args += [
        f"--tensor-model-parallel-size {layout.tp}",
        f"--pipeline-model-parallel-size {layout.pp}",
    ]
    if layout.vpp > 1:
        per_chunk = layout.layers_per_chunk()
        if layout.even:
            args.append(f"--num-layers-per-virtual-pipeline-stage {per_chunk[0][0]}")
        args.append("--overlap-p2p-communication" if cfg.parallel.interleaved_overlap else "--no-overlap-p2p-communication")
    if layout.pp > 1 and not layout.even:
        args.append(f"--pipeline-model-parallel-layout {_layout_string(layout)}")
    if layout.sequence_parallel:
        args.append("--sequence-parallel")
    if cfg.parallel.zero1_size != 1:
        args.append("--use-distributed-optimizer")
    if m.checkpoint >= 1:
        args += ["--recompute-granularity full", "--recompute-method uniform", "--recompute-num-layers 1"]
    elif m.checkpoint > 0:
        start, end = layout.stages[0][0]
        n = int((end - start) * m.checkpoint)
        if n:
            args += ["--recompute-granularity full", "--recompute-method block", f"--recompute-num-layers {n}"]
    args += [
        f"--micro-batch-size {d.micro_bsz}",
        f"--global-batch-size {d.micro_num * d.micro_bsz * layout.dp}" if layout.dp is not None
        else f"# --global-batch-size = {d.micro_num * d.micro_bsz} × data-parallel size (give --world-size)",
        f"--train-iters {d.total_steps}",
        f"--lr {_num(a.lr)}",
        f"--min-lr {_num(lr.eta_min)}",
        "--lr-decay-style cosine",
        f"--lr-warmup-iters {lr.init_steps + lr.warmup_steps}",
        f"--lr-decay-iters {lr.total_steps}",
        f"--adam-beta1 {_num(a.beta1)}",
        f"--adam-beta2 {_num(cfg.beta2_scheduler.init_beta2)}",
        f"--adam-eps {_num(a.eps)}",
        f"--weight-decay {_num(a.weight_decay)}",
        f"--clip-grad {_num(cfg.applied_clip_grad_norm)}",
        f"--seed {d.seed}",
    ]
    if m.dtype == "bf16":
        args.append("--bf16")
    elif m.dtype == "fp16":
        args += [
            "--fp16",
            f"--initial-loss-scale {_num(gs.initial_scale)}",
            f"--min-loss-scale {_num(gs.min_scale)}",
            f"--loss-scale-window {gs.growth_interval}",
            f"--hysteresis {gs.hysteresis}",
        ]
    if cfg.label_smoothing:
        args.append(f"# label_smoothing={cfg.label_smoothing:g}: no Megatron-LM argument")
    if m.out_proj_bias:
        args.append("# the attention output projection has a bias in InternEvo: Megatron-LM's --add-bias-linear "
                    "would also add MLP biases, so it has no exact equivalent")
    if cfg.beta2_scheduler.c > 0:
        args.append("# beta2_scheduler (c > 0): no Megatron-LM argument; beta2 stays constant")
    if m.dtype == "fp16" and (gs.growth_factor != 2 or gs.backoff_factor != 0.5):
        args.append("# grad_scaler growth/backoff factors other than 2 and 0.5: no Megatron-LM argument")
    return args


def _num(value: float) -> str:
    """``value`` as short as ``:g`` writes it when that reads back exactly, else every digit (``repr``)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def _layout_string(layout: ParallelLayout) -> str:
    """``E`` embedding, ``t`` decoder layer, ``L`` loss; stages separated by ``|``, vpp-major."""
    rows = []
    for chunk in range(layout.vpp):
        for stage in range(layout.pp):
            start, end = layout.stages[stage][chunk]
            row = "t" * (end - start)
            if chunk == 0 and stage == 0:
                row = "E" + row
            if chunk == layout.vpp - 1 and stage == layout.pp - 1:
                row += "L"
            rows.append(row)
    return "|".join(rows)


def megatron_args_text(cfg: InternLMConfig, layout: ParallelLayout) -> str:
    header = (f"# Megatron-LM pretrain_gpt.py arguments equivalent to {cfg.source}\n"
              "# Data, tokenizer, checkpoint and logging arguments are yours to add.\n")
    return header + "\n".join(megatron_args(cfg, layout)) + "\n"
