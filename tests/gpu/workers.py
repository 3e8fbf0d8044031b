"""Code that runs inside spawned ranks for the GPU tests.

Every function here runs on whatever device its process has: on the GPU when the test spawns it normally,
on the CPU (gloo, the CPU shim) when the test spawns it with ``tests.spawn.CPU_ONLY``. The same code thus
produces both sides of each GPU ⇄ CPU comparison, and runs on a CPU-only machine too.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from adapter.config import RawConfig, load_config, normalize, validate
from tests.conftest import CONFIGS, REPO, base_sections
from tests.model.workers import random_batches, random_logical, tiny_config

SEVEN_B_WIDTH = dict(num_layers=2, hidden_size=4096, num_attention_heads=32, num_kv_attention_heads=8,
                     vocab_size=1024, mlp_ratio=3.5, no_bias=True, rope_base=1e6)
"""InternLM2-7B's layer (hidden 4096, 32 heads, 8 kv heads, MLP 14336), two of them, a small vocabulary so
that the CPU reference stays quick."""


def model_config(name: str, dtype: str):
    """``tiny_internlm1``/``tiny_internlm2``: the model tests' tiny models; ``7b_width``: see SEVEN_B_WIDTH."""
    if name.startswith("tiny_"):
        return tiny_config(name[len("tiny_"):], dtype=dtype)
    s = base_sections()
    s["model_type"] = "INTERNLM2_PUBLIC"
    s["model"].update(SEVEN_B_WIDTH, dtype=dtype)
    cfg = normalize(RawConfig(s, f"{name}.py", {}))
    return cfg, validate(cfg, 1)


def forward_backward(name: str, dtype: str, seed: int = 0) -> dict:
    """At tp=1 on one rank: logits and losses of a forward pass and the (logical) gradients of a backward pass
    over packed rows, from the same random weights and data on every device and dtype. Results on the CPU,
    in fp32."""
    from adapter.config.to_mcore import model_options, transformer_config
    from adapter.model.build import build_model_chunks
    from adapter.model.forward import run_microbatches
    from adapter.model.mapping import chunk_state_dict, logical_from_chunk, model_state
    from adapter.runtime.dist import device, init_distributed

    torch.set_num_threads(min(8, os.cpu_count() or 1))  # the CPU reference of the 7B-width layers is the slow part
    cfg, layout = model_config(name, dtype)
    init_distributed(layout)
    config = transformer_config(cfg, layout, use_cpu_initialization=True)
    (chunk,) = build_model_chunks(config, model_options(cfg))
    logical = random_logical(cfg.model, seed)
    chunk.load_state_dict(chunk_state_dict(logical, cfg.model, layout, 0, 0, 0), strict=False)
    length = 32 if name.startswith("tiny_") else 256
    batches = [b.to(device()) for b in random_batches(seed, count=2, length=length, vocab=cfg.model.vocab_size)]
    chunk.eval()
    with torch.no_grad():
        reports = run_microbatches([chunk], batches, config, forward_only=True, keep_logits=True)
    chunk.train()
    chunk.zero_grad(set_to_none=True)
    run_microbatches([chunk], batches, config, forward_only=False)
    grads = {k: p.grad.detach().float().cpu() for k, p in chunk.named_parameters() if k in model_state(chunk)}
    return {
        "device": str(next(chunk.parameters()).device),
        "dtype": str(next(chunk.parameters()).dtype),
        "logits": [r["logits"].float().cpu() for r in reports],
        "losses": [float(r["loss"]) for r in reports],
        "grads": logical_from_chunk([grads], cfg.model, layout, 0, 0),
    }


def forward_backward_all(runs: list[tuple[str, str]]) -> dict[tuple[str, str], dict]:
    """``forward_backward`` for each ``(name, dtype)``, one after the other in this process."""
    return {(name, dtype): forward_backward(name, dtype) for name, dtype in runs}


def tiny_run_config(world: int, dtype: str, steps: int, folder: str, save: bool = False,
                    adam_eps: float | None = None, ckpt: dict | None = None):
    """``internlm_configs/tiny.py`` as shipped (pp=2 × 2 chunks) on 2 ranks; on one rank its model without
    pipeline stages. The shipped data, no TensorBoard; with ``save``, checkpoints in ``folder/ckpt`` and
    auto-resume from them, plus the ``ckpt`` keys given; ``adam_eps`` replaces the config's."""
    raw = load_config(CONFIGS / "tiny.py")
    values = raw.values
    values["model"]["dtype"] = dtype
    values["data"]["train_folder"] = str(REPO / "launch" / "data" / "tiny")
    values["data"]["total_steps"] = values["lr_scheduler"]["total_steps"] = steps
    if world == 1:
        values["model"]["num_chunks"] = 1
        values["parallel"]["pipeline"] = dict(size=1, interleaved_overlap=True)
    values["ckpt"] = dict(enable_save_ckpt=save, auto_resume=save, oss_snapshot_freq=0,
                          save_ckpt_folder=f"local:{folder}/ckpt", **(ckpt or {}))
    values["enable_tb"] = False
    if adam_eps is not None:
        values["adam"]["adam_eps"] = adam_eps
    cfg = normalize(raw)
    return cfg, validate(cfg, world)


def train_tiny(dtype: str, steps: int, folder: str, max_steps: int | None = None, save: bool = False,
               adam_eps: float | None = None, ckpt: dict | None = None) -> dict | None:
    """The training loop (``adapter.train.loop.train``) on the tiny config; on rank 0: the per-step records,
    the process-group backend and whether CUDA was used."""
    from adapter.train.loop import RunOptions, train

    cfg, layout = tiny_run_config(int(os.environ["WORLD_SIZE"]), dtype, steps, folder, save, adam_eps, ckpt)
    records = train(cfg, layout, RunOptions(max_steps=max_steps, run_dir=f"{folder}/run"))
    if dist.get_rank() != 0:
        return None
    return {"records": records, "backend": dist.get_backend(), "cuda": torch.cuda.is_available()}
