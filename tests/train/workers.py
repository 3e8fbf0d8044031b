"""Code that runs inside spawned ranks for the training tests."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from adapter.config import RawConfig, normalize, validate
from tests.conftest import base_sections
from tests.model.workers import random_batches, random_logical

GLOBAL_MICROBATCHES = 8  # per optimizer step, over all data-parallel ranks
STEPS = 5

#: name → (tensor, pipeline, virtual stages, sequence parallel, InternEvo model.checkpoint)
LAYOUTS = {
    "dp1": (1, 1, 1, False, False),
    "dp2": (1, 1, 1, False, False),
    "dp2_recompute": (1, 1, 1, False, 0.5),
    "tp2_sp": (2, 1, 1, True, False),
    "pp2_vpp2": (1, 2, 2, False, False),
    "dp2_pp2": (1, 2, 1, False, False),
}


def train_config(family: str, world: int, tp: int = 1, pp: int = 1, vpp: int = 1, sp: bool = False,
                 dtype: str = "torch.float32", micro_num: int | None = None, checkpoint: bool | float = False):
    s = base_sections()
    dp = world // (tp * pp)
    s["model"].update(num_layers=4, num_chunks=vpp, dtype=dtype, checkpoint=checkpoint)
    if family == "internlm2":
        s["model_type"] = "INTERNLM2_PUBLIC"
        s["model"].update(num_kv_attention_heads=2, no_bias=True)
    elif family == "llama2":  # GQA with attention biases (InternEvo's LLAMA2 default)
        s["model_type"] = "LLAMA2"
        s["model"].update(num_kv_attention_heads=2)
    s["data"].update(micro_num=micro_num or GLOBAL_MICROBATCHES // dp, micro_bsz=2, seq_len=16, total_steps=10)
    # Adam's eps 1e-8 turns tensor-parallel rounding noise into visible update noise (CPU_NOTES P8)
    s["adam"].update(lr=1e-2, adam_eps=1e-4, weight_decay=0.1)
    s["lr_scheduler"].update(total_steps=10, warmup_ratio=0.2, eta_min=1e-3)
    s["parallel"] = dict(zero1=-1, tensor=dict(size=tp, mode="msp" if sp else "mtp"),
                         pipeline=dict(size=pp, interleaved_overlap=True))
    # as the 7B demo sets it: must not make DeepSpeed reduce a gradient per micro-batch
    s["hybrid_zero_optimizer"]["overlap_sync_grad"] = True
    # the reference clips (torch's clip_grad_norm_), so these fp32 runs opt in to clipping; InternEvo's own
    # fp32 rule (no clipping) is held against its runs in test_internevo_trajectory
    s["adapter"] = dict(clip_grad_in_fp32=True)
    cfg = normalize(RawConfig(s, f"train_{family}.py", {}))
    return cfg, validate(cfg, world)


def global_batches(step: int):
    return random_batches(1000 + step, count=GLOBAL_MICROBATCHES)


def _build(cfg, layout, seed: int):
    from megatron.core import parallel_state as ps

    from adapter.config.to_mcore import model_options, transformer_config
    from adapter.model.build import build_model_chunks
    from adapter.model.mapping import chunk_state_dict
    from adapter.runtime.dist import init_distributed

    init_distributed(layout)
    config = transformer_config(cfg, layout, use_cpu_initialization=True)
    chunks = build_model_chunks(config, model_options(cfg))
    logical = random_logical(cfg.model, seed)
    for vp, chunk in enumerate(chunks):
        chunk.load_state_dict(chunk_state_dict(logical, cfg.model, layout, ps.get_pipeline_model_parallel_rank(), vp,
                                               ps.get_tensor_model_parallel_rank()), strict=False)
    return config, chunks


def _logical_weights(cfg, layout, chunks) -> dict:
    from megatron.core import parallel_state as ps

    from adapter.model.mapping import logical_from_chunk, model_state

    out = {}
    for vp, chunk in enumerate(chunks):
        shards = [None] * layout.tp
        dist.all_gather_object(shards, {k: v.detach().float().clone() for k, v in model_state(chunk).items()},
                               group=ps.get_tensor_model_parallel_group())
        if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            out.update(logical_from_chunk(shards, cfg.model, layout, ps.get_pipeline_model_parallel_rank(), vp))
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, out)
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def train_layout(family: str, name: str, dtype: str = "torch.float32") -> dict:
    """STEPS steps with the adapter's Trainer (DeepSpeed ZeRO-1 + megatron schedule) in layout ``name``."""
    from megatron.core import parallel_state as ps

    from adapter.train.engine import Trainer

    tp, pp, vpp, sp, checkpoint = LAYOUTS[name]
    cfg, layout = train_config(family, int(os.environ["WORLD_SIZE"]), tp, pp, vpp, sp, dtype, checkpoint=checkpoint)
    config, chunks = _build(cfg, layout, seed=0)
    trainer = Trainer(cfg, layout, chunks, config)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    steps = []
    for step in range(STEPS):
        mine = global_batches(step)[dp_rank::dp]
        result = trainer.train_step(mine)
        steps.append((result.loss, result.grad_norm, result.lr, result.skipped))
    return {"steps": steps, "weights": _logical_weights(cfg, layout, chunks)}


def train_matrix(family: str, names: list[str], dtype: str = "torch.float32") -> dict | None:
    out = {name: train_layout(family, name, dtype) for name in names}
    return out if dist.get_rank() == 0 else None


def reference(family: str) -> dict:
    """The same STEPS steps in one process without DeepSpeed: torch AdamW, clip_grad_norm_, our schedules."""
    from adapter.model.forward import run_microbatches
    from adapter.train.schedules import beta2, learning_rate

    cfg, layout = train_config(family, 1)
    config, chunks = _build(cfg, layout, seed=0)
    params = list(chunks[0].parameters())
    opt = torch.optim.AdamW(params, lr=cfg.adam.lr, betas=(cfg.adam.beta1, cfg.adam.beta2), eps=cfg.adam.eps,
                            weight_decay=cfg.adam.weight_decay)
    steps = []
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = learning_rate(step, cfg.adam.lr, cfg.lr_scheduler)
            g["betas"] = (cfg.adam.beta1, beta2(step, cfg.adam.beta2, cfg.beta2_scheduler))
        opt.zero_grad(set_to_none=True)
        reports = run_microbatches(chunks, global_batches(step), config, forward_only=False)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.zero_optimizer.clip_grad_norm)
        opt.step()
        steps.append((sum(float(r["loss"]) for r in reports) / len(reports), float(norm), g["lr"], False))
    return {"steps": steps, "weights": _logical_weights(cfg, layout, chunks)}


def accumulation(family: str) -> dict:
    """micro_num=4 × one piece-aligned row each, against micro_num=1 with the same four rows packed together."""
    from adapter.model.forward import MicroBatch
    from adapter.train.engine import Trainer

    rows = []
    g = torch.Generator().manual_seed(7)
    for _ in range(4):  # every row: 3 pieces, so every micro-batch has the same number of labelled tokens
        ids = torch.randint(0, 128, (1, 32), generator=g)
        labels = torch.randint(0, 128, (1, 32), generator=g)
        cu = torch.tensor([0, 7, 20, 32], dtype=torch.int32)
        labels[0, cu[1:] - 1] = -100
        rows.append(MicroBatch(ids, labels, cu))
    joined = MicroBatch(torch.cat([r.input_ids for r in rows], 1), torch.cat([r.labels for r in rows], 1),
                        torch.tensor([0, 7, 20, 32, 39, 52, 64, 71, 84, 96, 103, 116, 128], dtype=torch.int32))
    out = {}
    for name, micro_num, batches in (("four", 4, rows), ("one", 1, [joined])):
        cfg, layout = train_config(family, 1, micro_num=micro_num)
        config, chunks = _build(cfg, layout, seed=3)
        result = Trainer(cfg, layout, chunks, config).train_step(batches)
        out[name] = {"loss": result.loss, "norm": result.grad_norm, "weights": _logical_weights(cfg, layout, chunks)}
    return out


def single_process_suite() -> dict:
    """Everything that needs one rank: both references, the adapter at dp=1, and the accumulation check."""
    return {
        "reference": {family: reference(family) for family in ("internlm1", "internlm2", "llama2")},
        "dp1": train_layout("internlm1", "dp1"),
        "accumulation": accumulation("internlm1"),
    }


def two_rank_suite() -> dict | None:
    out = {("internlm1", name): train_layout("internlm1", name) for name in ("dp2", "dp2_recompute", "tp2_sp",
                                                                            "pp2_vpp2")}
    out[("internlm2", "tp2_sp")] = train_layout("internlm2", "tp2_sp")
    out[("llama2", "pp2_vpp2")] = train_layout("llama2", "pp2_vpp2")
    out[("internlm1", "dp2_bf16")] = train_layout("internlm1", "dp2", dtype="torch.bfloat16")
    return out if dist.get_rank() == 0 else None


def fp16_overflow_run(steps: int = 8) -> dict:
    """fp16 with a loss scale far too large, on DeepSpeed's CPU accelerator forced to accept fp16 (CPU_NOTES
    §3: its mkldnn probe says no on AVX2-only hosts). Records each step's scale, skip flag and lr."""
    import dataclasses

    from deepspeed.accelerator import get_accelerator

    from adapter.train.engine import Trainer

    get_accelerator().is_fp16_supported = lambda: True  # test-only override, see the docstring
    cfg, layout = train_config("internlm1", 1, dtype="torch.float16")
    cfg = dataclasses.replace(cfg, grad_scaler=dataclasses.replace(cfg.grad_scaler, initial_scale=2.0**24,
                                                                   hysteresis=2, growth_interval=3))
    config, chunks = _build(cfg, layout, seed=0)
    trainer = Trainer(cfg, layout, chunks, config)
    trace = []
    for step in range(steps):
        result = trainer.train_step(global_batches(step))
        trace.append((result.loss_scale, result.skipped, result.lr, trainer.step_count, result.loss))
    return {"trace": trace, "final_scale": trainer.scaler.scale}
