"""Code that runs inside spawned ranks for the InternEvo-trajectory tests (importable by the spawn method).

Every run goes through the real training loop (``adapter.train.loop.train``) from an InternEvo config file,
exactly as ``launch/train.py`` calls it; the tests read what it leaves behind (``metrics.jsonl`` and the
checkpoint folders), as a user would.
"""

from __future__ import annotations

import os

import torch


def train_runs(runs: list[tuple[str, str, int | None]], failing: list[tuple[str, str]] = ()) -> list[str]:
    """Train each ``(config file, run folder, max_steps)`` in turn in this process group, then each
    ``failing`` ``(config file, run folder)``: their ``ConfigError`` messages on this rank are returned
    (each must fail on every rank, none waiting for another)."""
    from adapter.config import ConfigError, read_config
    from adapter.train.loop import RunOptions, train

    for config_path, run_dir, max_steps in runs:
        cfg, layout = read_config(config_path, world_size=int(os.environ["WORLD_SIZE"]))
        train(cfg, layout, RunOptions(run_dir=run_dir, max_steps=max_steps))
    messages = []
    for config_path, run_dir in failing:
        cfg, layout = read_config(config_path, world_size=int(os.environ["WORLD_SIZE"]))
        try:
            train(cfg, layout, RunOptions(run_dir=run_dir))
            messages.append("no error")
        except ConfigError as exc:
            messages.append(str(exc))
    return messages


def adamw_step(config_path: str, weights: dict[str, torch.Tensor] | str, batch: dict,
               lr: float) -> dict[str, torch.Tensor]:
    """One update in one process without DeepSpeed: the tp=1 model set to ``weights`` (logical InternEvo
    names, or a checkpoint folder to read them from), forward/backward over ``batch`` (one InternEvo batch), then
    a fresh ``torch.optim.AdamW`` step at ``lr`` on fp32 master copies without clipping (InternEvo 0.5.2 clips
    nothing in fp32; one bf16 step here stays under the threshold). Returns the logical weights after it."""
    from adapter.config import read_config
    from adapter.config.to_mcore import model_options, transformer_config
    from adapter.model.build import build_model_chunks
    from adapter.model.forward import run_microbatches
    from adapter.model.mapping import chunk_state_dict, logical_from_chunk, model_state
    from adapter.runtime.dist import init_distributed
    from adapter.train.batches import to_microbatches

    cfg, layout = read_config(config_path, world_size=1)
    assert layout.tp == layout.pp == 1
    if isinstance(weights, str):
        from adapter.checkpoint.convert import open_checkpoint

        weights = dict(open_checkpoint(weights, cfg.model).tensors)
    init_distributed(layout)
    config = transformer_config(cfg, layout, use_cpu_initialization=True)
    chunks = build_model_chunks(config, model_options(cfg))
    chunks[0].load_state_dict(chunk_state_dict(weights, cfg.model, layout, 0, 0, 0), strict=False)
    params = list(chunks[0].parameters())
    # fp32 master weights, as mixed-precision optimizers keep them (the same tensors in fp32 runs)
    masters = [p.detach().float().clone() for p in params]
    adam = cfg.adam
    opt = torch.optim.AdamW(masters, lr=lr, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                            weight_decay=adam.weight_decay)
    micro = to_microbatches(batch, packed=True, micro_bsz=cfg.data.micro_bsz, seq_len=cfg.data.seq_len)
    run_microbatches(chunks, micro, config, forward_only=False)
    for master, p in zip(masters, params):
        master.grad = p.grad.float()
    opt.step()
    with torch.no_grad():
        for master, p in zip(masters, params):
            p.copy_(master)
    state = {k: v.detach().clone() for k, v in model_state(chunks[0]).items()}
    return logical_from_chunk([state], cfg.model, layout, 0, 0)


def single_process_suite(runs: list[tuple[str, str, int | None]],
                         references: list[tuple[str, dict | str, dict, float]]) -> list[dict[str, torch.Tensor]]:
    """``train_runs(runs)``, then ``adamw_step`` for each ``(config file, weights, batch, lr)`` (these may read
    checkpoints the runs wrote)."""
    train_runs(runs)
    return [adamw_step(*job) for job in references]
