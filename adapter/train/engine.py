"""DeepSpeed ZeRO-1 as the optimizer of megatron-core's model chunks and pipeline schedule.

Who does what, per optimizer step:

1. The trainer sets InternEvo's ``lr`` and ``beta2`` for this step on the optimizer's param groups
   (``schedules``), since DeepSpeed's scheduler cannot express InternEvo's.
2. megatron-core's ``get_forward_backward_func()`` runs forward/backward over the micro-batches (1F1B, or
   interleaved with several chunks). It divides each micro-batch loss by the number of micro-batches, so
   DeepSpeed runs with ``gradient_accumulation_steps = 1`` and never scales by accumulation again. With fp16
   it multiplies the last stage's loss by the loss scale (``grad_scale_func``).
3. At the end of the schedule megatron calls ``finalize_model_grads_func`` (``_finalize``): gradients of
   sequence-parallel parameters (norm weights, row-parallel biases) are partial sums per tensor rank and are
   summed over the tensor group here; then ``engine.allreduce_gradients()`` averages every gradient over
   data parallel once (ZeRO-1's reduction).
4. ``engine.step()``: DeepSpeed checks for inf/nan (and then skips the update, as InternEvo does), computes
   the global norm over data × tensor × pipeline ranks, unscales, clips (in fp16/bf16 only, as InternEvo
   0.5.2: ``InternLMConfig.applied_clip_grad_norm``), runs AdamW on its optimizer-state partition and
   all-gathers the updated parameters.

The engine copies the module's weights into its fp32 master partitions when it is built, so weights from a
checkpoint must be in the chunks before ``Trainer`` is constructed (``train.loop`` does so); a full resume
goes through DeepSpeed's own ``load_checkpoint``, which restores (or, without optimizer state, refreshes)
the masters.

The optimizer is a client ``torch.optim.AdamW`` over one parameter group (InternEvo decays every
parameter), so DeepSpeed builds no fused-Adam extension; DeepSpeed's shared-memory inference all-reduce
extension is disabled for the same reason (it would be JIT-compiled at start-up and is never used here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer import TransformerConfig

from adapter.checkpoint.io.safe_load import load_deepspeed_file
from adapter.config.schema import InternLMConfig
from adapter.config.to_deepspeed import deepspeed_config
from adapter.model.forward import MicroBatch, run_microbatches
from adapter.runtime.layout import ParallelLayout
from adapter.runtime.mpu import MegatronMPU
from adapter.train.schedules import LossScaler, beta2, learning_rate


class Chunks(torch.nn.Module):
    """Holds the model chunks so that DeepSpeed sees every parameter. Its ``forward`` is never called:
    megatron-core's schedule drives the chunks itself."""

    def __init__(self, chunks: list[torch.nn.Module]):
        super().__init__()
        self.chunks = torch.nn.ModuleList(chunks)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the chunks are run by megatron-core's pipeline schedule, not by the DeepSpeed engine")


def training_ds_config(cfg: InternLMConfig, layout: ParallelLayout) -> dict[str, Any]:
    """``internlm-config``'s DeepSpeed JSON as the engine runs it: AdamW comes as a client optimizer and the
    lr/beta2 schedule is applied by the trainer, so those two sections are left out."""
    ds = deepspeed_config(cfg, layout)
    ds.pop("optimizer")
    ds.pop("scheduler")
    return ds


@dataclass
class StepResult:
    """One optimizer step. ``loss`` is the mean micro-batch loss averaged over data parallel (known on
    every rank); ``skipped`` means DeepSpeed found inf/nan gradients and did not update."""

    loss: float
    grad_norm: float
    lr: float
    beta2: float
    loss_scale: float
    skipped: bool
    tokens: int


def step_loss(reports: list[dict]) -> float:
    """The step loss from ``run_microbatches``' reports (known on the last pipeline stage): the mean
    micro-batch loss, averaged over data parallel and sent to every rank."""
    value = torch.zeros(1, dtype=torch.float64)
    if reports:
        value += sum(float(r["loss"]) for r in reports) / len(reports)
    if torch.cuda.is_available():
        value = value.cuda()
    dist.all_reduce(value, group=ps.get_data_parallel_group())
    last = ps.get_pipeline_model_parallel_last_rank()
    dist.broadcast(value, src=last, group=ps.get_pipeline_model_parallel_group())
    return float(value) / ps.get_data_parallel_world_size()


def _no_jit_ops() -> None:
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class Trainer:
    """One training run's engine: the chunks, DeepSpeed, and InternEvo's schedules."""

    def __init__(self, cfg: InternLMConfig, layout: ParallelLayout, chunks: list[torch.nn.Module],
                 config: TransformerConfig):
        import deepspeed

        self.cfg, self.layout, self.chunks, self.config = cfg, layout, chunks, config
        params = [p for chunk in chunks for p in chunk.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.adam.lr, betas=(cfg.adam.beta1, cfg.adam.beta2),
                                      eps=cfg.adam.eps, weight_decay=cfg.adam.weight_decay)
        _no_jit_ops()
        self.deepspeed, self.optimizer, _, _ = deepspeed.initialize(
            model=Chunks(chunks), optimizer=optimizer, mpu=MegatronMPU(), config=training_ds_config(cfg, layout),
            dist_init_required=False)
        # DeepSpeed unpickles its checkpoint files without restriction; read them through an allow-list
        self.deepspeed.checkpoint_engine.load = load_deepspeed_file
        self.scaler = LossScaler(cfg.grad_scaler, enabled=cfg.model.dtype == "fp16")
        if self.scaler.enabled:
            # DeepSpeed's scaler only unscales; InternEvo's rules decide the scale (see ``step``)
            self.optimizer.loss_scaler.raise_error_at_min_scale = False
            self.optimizer.loss_scaler.cur_scale = self.scaler.scale
        # chunks may carry their own config copy (per-chunk recompute); the schedule reads the first chunk's
        for each in {id(c): c for c in [config, *(chunk.config for chunk in chunks)]}.values():
            each.finalize_model_grads_func = self._finalize
            if self.scaler.enabled:
                each.grad_scale_func = lambda loss: loss * self.scaler.scale
        self.sequence_parallel_params = [p for p in params if getattr(p, "sequence_parallel", False)]
        self.step_count = 0

    def _finalize(self, *args: Any, **kwargs: Any) -> None:
        """megatron's end-of-schedule hook: complete partial gradients, then ZeRO's data-parallel average."""
        if self.layout.tp > 1 and self.layout.sequence_parallel:
            group = ps.get_tensor_model_parallel_group()
            for p in self.sequence_parallel_params:
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=group)
        self.deepspeed.allreduce_gradients()

    def train_step(self, batches: list[MicroBatch]) -> StepResult:
        """Forward, backward and one optimizer update over ``batches`` (this rank's micro-batches)."""
        t = self.step_count
        lr = learning_rate(t, self.cfg.adam.lr, self.cfg.lr_scheduler)
        b2 = beta2(t, self.cfg.adam.beta2, self.cfg.beta2_scheduler)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["betas"] = (self.cfg.adam.beta1, b2)
        scale = self.scaler.scale
        for chunk in self.chunks:
            chunk.train()
        reports = run_microbatches(self.chunks, batches, self.config, forward_only=False,
                                   label_smoothing=self.cfg.label_smoothing)
        self.deepspeed.step()
        skipped = bool(getattr(self.optimizer, "overflow", False))
        if not skipped:
            self.step_count += 1
        self.scaler.update(skipped)
        if self.scaler.enabled:
            self.optimizer.loss_scaler.cur_scale = self.scaler.scale
        norm = self.deepspeed.get_global_grad_norm()
        return StepResult(
            loss=step_loss(reports),
            grad_norm=float(norm) if norm is not None else float("nan"),
            lr=lr,
            beta2=b2,
            loss_scale=scale,
            skipped=skipped,
            tokens=sum(int(b.input_ids.numel()) for b in batches) * ps.get_data_parallel_world_size(),
        )

    def evaluate(self, batches: list[MicroBatch]) -> float:
        """Mean micro-batch loss of a forward-only pass (no gradients), averaged over data parallel."""
        for chunk in self.chunks:
            chunk.eval()
        with torch.no_grad():
            reports = run_microbatches(self.chunks, batches, self.config, forward_only=True,
                                       label_smoothing=self.cfg.label_smoothing)
        return step_loss(reports)


