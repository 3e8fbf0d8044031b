"""The training loop: an InternEvo config in, a trained model, logs and checkpoints out.

Order of things: process groups and megatron's parallel state from the config's layout, the model chunks,
the DeepSpeed engine (``engine.Trainer``), then per step: this data-parallel rank's batch, forward/backward
through megatron's schedule, the optimizer step, logging on the log rank (console line and progress bar,
``metrics.jsonl``, TensorBoard) and checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from tqdm import tqdm

from adapter.config.schema import InternLMConfig
from adapter.runtime.layout import ParallelLayout

METRICS_FILE = "metrics.jsonl"


@dataclass
class RunOptions:
    """Launch-time choices that are not part of the InternEvo config."""

    seed: int = 1024
    peak_tflops: Optional[float] = None
    """Peak dense TFLOPS of one device in the training dtype, for MFU (e.g. 989 for an H100 in bf16)."""
    max_steps: Optional[int] = None
    """Stop after this many steps in this launch (``total_steps`` still drives the schedules)."""
    tensorboard_dir: Optional[str] = None
    """Default: ``tensorboard_folder`` from the config, else ``<run_dir>/tensorboard``."""
    run_dir: Optional[str] = None
    """Where the run's own outputs go (``metrics.jsonl``, TensorBoard logs, error logs); default
    ``runs/<JOB_NAME>``."""

    def folder(self, cfg: InternLMConfig) -> Path:
        """The run folder: ``run_dir``, else ``runs/<JOB_NAME>``."""
        return Path(self.run_dir or os.path.join("runs", cfg.job_name))


def is_log_rank() -> bool:
    """InternEvo's log rank: the last pipeline stage, tensor rank 0, data-parallel rank 0."""
    from megatron.core import parallel_state as ps

    return (ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_data_parallel_rank() == 0)


def train(cfg: InternLMConfig, layout: ParallelLayout, options: RunOptions) -> list[dict]:
    """Run training as configured; returns the per-step records (on every rank)."""
    from megatron.core import parallel_state as ps

    from adapter.config.to_mcore import model_options, transformer_config
    from adapter.data.loader import build_train_batches
    from adapter.data.validation import build_valid_batches
    from adapter.model.build import build_model_chunks
    from adapter.runtime.dist import device as run_device, init_distributed
    from adapter.train.batches import piece_lengths, to_microbatches
    from adapter.train.checkpointing import Checkpointer
    from adapter.train.engine import Trainer
    from adapter.train.metrics import flops_per_token, mean_attended_length

    init_distributed(layout, seed=options.seed)
    torch.backends.cudnn.deterministic = cfg.cudnn_deterministic
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    if cfg.model.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    checkpointer = Checkpointer(cfg, layout)
    checkpointer.check_storage()  # before any compute: a save location that fails would fail at the first save
    start = checkpointer.plan_resume()
    checkpointer.check_load(start)
    config = transformer_config(cfg, layout, use_cpu_initialization=not torch.cuda.is_available())
    chunks = build_model_chunks(config, model_options(cfg))
    if start.where is not None:
        # before the engine exists: DeepSpeed ZeRO copies its fp32 master weights from the module at
        # initialisation, so weights loaded later would be replaced by random init + update at step 1
        # (a full resume with the optimizer skips this: its fp32 masters give the weights)
        checkpointer.load_weights(start, chunks)
    trainer = Trainer(cfg, layout, chunks, config)
    context = checkpointer.load_state(start, trainer) if start.full else {}
    device = run_device()

    logger = StepLogger(cfg, options, trainer.step_count) if is_log_rank() else None
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    saved_sampler = context.pop("sampler", None)
    if saved_sampler is not None and saved_sampler["data_world_size"] != dp_size and is_log_rank():
        print(f"resuming at data-parallel size {dp_size} (saved at {saved_sampler['data_world_size']}): the global "
              f"batch of {cfg.data.micro_num * dp_size} rows is kept, each rank now trains on {cfg.data.micro_num} "
              "of them per step", flush=True)
    sampler, data = build_train_batches(cfg.data, dp_rank, dp_size, sampler_state=saved_sampler,
                                        vocab_size=cfg.model.vocab_size, num_workers=cfg.data.num_worker)
    # InternEvo's TrainState, saved as context.pt
    context = {key: context.get(key, default) for key, default in
               (("batch_count", -1), ("num_consumed_tokens", 0), ("inf_nan_skip_batches", 0))}
    context["tensorboard_folder"] = cfg.tensorboard_folder
    valid = build_valid_batches(cfg.data, dp_rank, dp_size, cfg.model.vocab_size) if cfg.data.valid_every else {}
    last_step = cfg.data.total_steps if options.max_steps is None else min(cfg.data.total_steps, options.max_steps)
    records = []
    while trainer.step_count < last_step:
        batch_count, batch = next(data)
        if any(lo <= batch_count <= hi for lo, hi in cfg.data.skip_batches):
            continue  # InternEvo counts a skipped batch but does not train on it
        micro = [b.to(device) for b in to_microbatches(batch, packed=cfg.data.use_packed_dataset,
                                                        micro_bsz=cfg.data.micro_bsz, seq_len=cfg.data.seq_len)]
        start = time.perf_counter()
        result = trainer.train_step(micro)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        context["batch_count"] = batch_count
        context["num_consumed_samples_in_epoch"] = sampler.consumed  # one rank's rows, as InternEvo counts
        context["num_consumed_tokens"] += result.tokens
        context["inf_nan_skip_batches"] += int(result.skipped)
        flops = flops_per_token(cfg.model, mean_attended_length(piece_lengths(micro))) * result.tokens
        record = {"step": trainer.step_count, "batch_count": batch_count, "loss": result.loss, "lr": result.lr,
                  "beta2": result.beta2, "grad_norm": result.grad_norm, "loss_scale": result.loss_scale,
                  "skipped": result.skipped, "tokens": result.tokens, "tokens_per_s": result.tokens / seconds,
                  "tflops": flops / seconds / 1e12 / dist.get_world_size()}
        if options.peak_tflops:
            record["mfu"] = record["tflops"] / options.peak_tflops
        if valid and not result.skipped and trainer.step_count % cfg.data.valid_every == 0:
            for name, batches in valid.items():
                record[f"valid/{name}/loss"] = _validate(trainer, batches, cfg, layout, device)
        records.append(record)
        if logger is not None:
            logger.log(record)
        if not result.skipped and checkpointer.after_step(trainer.step_count, trainer, sampler, context):
            break  # the stop file asked to save and stop here
    checkpointer.close()  # waits for an asynchronous upload and puts its completion marker last
    if logger is not None:
        logger.close()
    return records


def _validate(trainer, batches: list[dict], cfg: InternLMConfig, layout: ParallelLayout,
              device: torch.device) -> float:
    """Mean loss over one validation set: each batch is split into micro-batches of ``micro_bsz`` rows (a
    multiple of the pipeline size of them with the interleaved schedule, extra rows dropped)."""
    from adapter.model.forward import MicroBatch

    losses = []
    for batch in batches:
        rows = [MicroBatch(batch["input_ids"][i:i + cfg.data.micro_bsz], batch["labels"][i:i + cfg.data.micro_bsz])
                for i in range(0, batch["input_ids"].shape[0], cfg.data.micro_bsz)]
        if layout.vpp > 1:
            rows = rows[: len(rows) // layout.pp * layout.pp]
        if rows:
            losses.append(trainer.evaluate([r.to(device) for r in rows]))
    return sum(losses) / len(losses) if losses else float("nan")


class StepLogger:
    """Per step: one console line (with a progress bar when stderr is a terminal), one JSON line with every
    number at full precision (``<run_dir>/metrics.jsonl``, appended to across launches), and TensorBoard
    scalars when ``enable_tb`` is set and tensorboard is installed."""

    def __init__(self, cfg: InternLMConfig, options: RunOptions, start_step: int):
        self.bar = tqdm(total=cfg.data.total_steps, initial=start_step, desc=cfg.job_name, unit="step",
                        dynamic_ncols=True, disable=not sys.stderr.isatty())
        run_dir = options.folder(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = open(run_dir / METRICS_FILE, "a", encoding="utf-8")
        self.writer = None
        if cfg.enable_tb:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional dependency
                warnings.warn(f"enable_tb is set but tensorboard is not installed (pip install tensorboard): no "
                              f"TensorBoard logs; the metrics are in {run_dir / METRICS_FILE}", stacklevel=2)
            else:
                folder = options.tensorboard_dir or cfg.tensorboard_folder or str(run_dir / "tensorboard")
                self.writer = SummaryWriter(folder)

    def log(self, r: dict) -> None:
        # json writes floats as repr, so every digit survives; inf/nan (a skipped step's norm) become null
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()}
        self.metrics.write(json.dumps(finite) + "\n")
        self.metrics.flush()
        mfu = f" mfu={r['mfu']:.1%}" if "mfu" in r else ""
        valid = "".join(f" {k}={v:.4f}" for k, v in r.items() if k.startswith("valid/"))
        tqdm.write(f"step {r['step']:>5} loss={r['loss']:.4f} lr={r['lr']:.3g} grad_norm={r['grad_norm']:.3f} "
                   f"loss_scale={r['loss_scale']:g} tokens/s={r['tokens_per_s']:.0f} "
                   f"tflops={r['tflops']:.3f}{mfu}{valid}{' SKIPPED (inf/nan)' if r['skipped'] else ''}")
        self.bar.update(0 if r["skipped"] else 1)
        if self.writer is not None:
            for key in ("loss", "lr", "grad_norm", "loss_scale", "tokens_per_s", "tflops", "mfu"):
                if key in r:
                    self.writer.add_scalar(f"train/{key}", r[key], r["step"])
            for key, value in r.items():
                if key.startswith("valid/"):
                    self.writer.add_scalar(key, value, r["step"])

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()
        if self.writer is not None:
            self.writer.close()
