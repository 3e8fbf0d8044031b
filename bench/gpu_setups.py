"""The two training setups ``bench/gpu.py`` compares, built on the same model chunks, data and batch.

* ``AdapterSetup``: the adapter's engine as ``launch/train.py`` runs it (``adapter.train.engine.Trainer``:
  DeepSpeed ZeRO-1 over megatron-core's schedule, InternEvo's lr and beta2 schedules).
* ``MegatronSetup``: plain megatron-core: the same chunks (``adapter.model.build``: the same layer spec,
  attention and norms) wrapped in megatron-core's ``DistributedDataParallel`` with its distributed optimizer
  (``get_megatron_optimizer`` with ``use_distributed_optimizer=True``: fp32 gradient buffers reduce-scattered
  over data parallel, Adam on each rank's shard, parameters all-gathered), ``finalize_model_grads`` and the
  same schedule. It applies the same lr and beta2 each step, so both setups' losses can be compared.

Both are built from the same seed, so their first-step losses are equal: a check that the comparison is like
for like. Each exposes ``step(batches) -> loss`` and ``optimizer_name``, which optimizer implementation it runs.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from adapter.config.schema import InternLMConfig
from adapter.model.forward import MicroBatch, run_microbatches
from adapter.runtime.dist import device
from adapter.runtime.layout import ParallelLayout
from adapter.train.engine import Trainer, step_loss
from adapter.train.schedules import beta2, learning_rate


def _build(cfg: InternLMConfig, layout: ParallelLayout, seed: int):
    """A fresh ``TransformerConfig`` and model chunks, initialised from ``seed`` on the run's device."""
    from adapter.config.to_mcore import model_options, transformer_config
    from adapter.model.build import build_model_chunks

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    config = transformer_config(cfg, layout, use_cpu_initialization=device().type == "cpu")
    return config, build_model_chunks(config, model_options(cfg))


class AdapterSetup:
    name = "adapter: DeepSpeed ZeRO-1 + megatron-core schedule"

    def __init__(self, cfg: InternLMConfig, layout: ParallelLayout, seed: int):
        config, chunks = _build(cfg, layout, seed)
        self.trainer = Trainer(cfg, layout, chunks, config)
        self.optimizer_name = f"DeepSpeed {type(self.trainer.optimizer).__name__} over torch.optim.AdamW"

    def step(self, batches: list[MicroBatch]) -> float:
        return self.trainer.train_step(batches).loss


class MegatronSetup:
    name = "megatron-core: DDP + distributed optimizer"

    def __init__(self, cfg: InternLMConfig, layout: ParallelLayout, seed: int):
        from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                               finalize_model_grads)
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.cfg = cfg
        self.config, chunks = _build(cfg, layout, seed)
        ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True,
                                            bucket_size=cfg.zero_optimizer.reduce_bucket_size)
        # as Megatron-LM does: only the first chunk's gradients go in buckets reduced during backward
        self.model = [DistributedDataParallel(self.config, ddp, chunk, disable_bucketing=i > 0)
                      for i, chunk in enumerate(chunks)]
        m = cfg.model
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=cfg.adam.lr, weight_decay=cfg.adam.weight_decay, adam_beta1=cfg.adam.beta1,
            adam_beta2=cfg.adam.beta2, adam_eps=cfg.adam.eps, clip_grad=cfg.zero_optimizer.clip_grad_norm,
            bf16=m.dtype == "bf16", fp16=m.dtype == "fp16", params_dtype=self.config.params_dtype,
            use_distributed_optimizer=True), self.model)
        # get_megatron_optimizer returns a ChainedOptimizer even around a single DistributedOptimizer
        parts = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        inner = type(parts[0].optimizer)
        self.optimizer_name = (f"megatron {' + '.join(type(p).__name__ for p in parts)} over "
                               f"{inner.__module__}.{inner.__name__}")
        self.config.finalize_model_grads_func = finalize_model_grads
        self.step_count = 0

    def step(self, batches: list[MicroBatch]) -> float:
        lr = learning_rate(self.step_count, self.cfg.adam.lr, self.cfg.lr_scheduler)
        b2 = beta2(self.step_count, self.cfg.adam.beta2, self.cfg.beta2_scheduler)
        for group in self.optimizer.param_groups:
            group["lr"], group["betas"] = lr, (self.cfg.adam.beta1, b2)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = run_microbatches(self.model, batches, self.config, forward_only=False)
        self.optimizer.step()
        self.step_count += 1
        return step_loss(reports)


SETUPS = {"adapter": AdapterSetup, "megatron": MegatronSetup}
