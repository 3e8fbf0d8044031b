"""The optimizer state of a training checkpoint, per logical tensor, so that a run resumes at any layout.

DeepSpeed's own ZeRO-1 checkpoint holds each data-parallel rank's flat fp32 partition: it can only be read
back at the layout that wrote it. Here every parameter's fp32 master weight and Adam moments are gathered
the way the model is (whole per tensor rank from ZeRO's partitions, then tensor ranks merged into InternEvo's
logical tensors) and written as three InternEvo-layout model folders beside the weights:

    <checkpoint>/optimizer/fp32/model_tp{t}_pp{p}.pt        fp32 master weights
    <checkpoint>/optimizer/exp_avg/model_tp{t}_pp{p}.pt     Adam's first moment
    <checkpoint>/optimizer/exp_avg_sq/model_tp{t}_pp{p}.pt  Adam's second moment
    <checkpoint>/optimizer/state.pt                        Adam's step per parameter group

so the checkpoint bridge reads them at any tensor/pipeline/virtual layout, like the weights. Loading cuts
each tensor for this rank (``chunk_state_dict``) and hands it to ZeRO's partition through DeepSpeed's
``safe_set_full_*`` API; a state of a parameter is the same whatever the data-parallel size, so the
data-parallel size may change too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from adapter.checkpoint.formats.internevo import model_config_dict, shard_state_dict
from adapter.checkpoint.io.safe_load import load_metadata
from adapter.config.schema import InternLMConfig
from adapter.runtime.layout import ParallelLayout

FOLDER = "optimizer"
STATES = ("fp32", "exp_avg", "exp_avg_sq")
STEPS_FILE = "state.pt"


def gather_logical(cfg: InternLMConfig, layout: ParallelLayout, chunks: list,
                   value: Callable[[str, torch.nn.Parameter], torch.Tensor]) -> dict[str, torch.Tensor]:
    """This pipeline stage's logical tensors of ``value(name, parameter)`` (collective over the tensor
    group, and over whatever group ``value`` itself talks to)."""
    from megatron.core import parallel_state as ps

    from adapter.model.mapping import logical_from_chunk

    pp_rank = ps.get_pipeline_model_parallel_rank()
    logical: dict[str, torch.Tensor] = {}
    for vp, chunk in enumerate(chunks):
        local = {name: value(name, p).detach().cpu() for name, p in chunk.named_parameters()}
        shards = [None] * layout.tp
        dist.all_gather_object(shards, local, group=ps.get_tensor_model_parallel_group())
        logical.update(logical_from_chunk(shards, cfg.model, layout, pp_rank, vp))
    return logical


def has_state(trainer) -> bool:
    """Whether Adam has taken a step (before the first update there is no state to save)."""
    return bool(trainer.optimizer.optimizer.state)


def save_optimizer_state(folder: Path, cfg: InternLMConfig, layout: ParallelLayout, trainer,
                         save: Callable[[object, Path], None]) -> None:
    """Write ``folder/optimizer``; collective over all ranks (ZeRO gathers each state over data parallel)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from megatron.core import parallel_state as ps

    if not has_state(trainer):
        return
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    for key in STATES:
        def value(name: str, p: torch.nn.Parameter, key: str = key) -> torch.Tensor:
            return safe_get_full_fp32_param(p) if key == "fp32" else safe_get_full_optimizer_state(p, key)

        logical = gather_logical(cfg, layout, trainer.chunks, value)
        if ps.get_data_parallel_rank() == 0:
            target = folder / FOLDER / key
            target.mkdir(parents=True, exist_ok=True)
            save(shard_state_dict(logical, cfg.model, layout, tp_rank, pp_rank), target / f"model_tp{tp_rank}_pp{pp_rank}.pt")
            if tp_rank == 0 and pp_rank == 0:
                save(model_config_dict(cfg.model), target / "model_config.pt")
    if dist.get_rank() == 0:
        adam = trainer.optimizer.optimizer
        steps = [int(adam.state[group["params"][0]]["step"]) for group in adam.param_groups]
        save({"steps": steps}, folder / FOLDER / STEPS_FILE)


def load_optimizer_state(folder: Path, cfg: InternLMConfig, layout: ParallelLayout, trainer) -> None:
    """Fill ZeRO-1's fp32 partitions and Adam's moments and step from ``folder/optimizer`` (any layout)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state
    from megatron.core import parallel_state as ps

    from adapter.checkpoint.convert import open_checkpoint
    from adapter.checkpoint.errors import CheckpointError
    from adapter.model.mapping import chunk_state_dict

    root = folder / FOLDER
    zero = trainer.optimizer
    adam = zero.optimizer
    steps = load_metadata(root / STEPS_FILE)["steps"]
    if len(steps) != len(adam.param_groups):
        raise CheckpointError(f"{root / STEPS_FILE}: {len(steps)} parameter groups, the optimizer has "
                              f"{len(adam.param_groups)}")
    # Adam's state is created at its first step; create it now (zeros, then filled below) and link ZeRO's
    # per-parameter views into it, as DeepSpeed does before loading a universal checkpoint
    for i, (group, step) in enumerate(zip(adam.param_groups, steps)):
        flat = group["params"][0]
        adam.state[flat] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(flat),
                            "exp_avg_sq": torch.zeros_like(flat)}
        lazy_init_hp_params_optimizer_state(zero.bit16_groups[i], zero.single_partition_of_fp32_groups[i], adam.state)
    pp_rank, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    for key in STATES:
        source = open_checkpoint(root / key, cfg.model)
        for vp, chunk in enumerate(trainer.chunks):
            values = chunk_state_dict(source.tensors, cfg.model, layout, pp_rank, vp, tp_rank)
            for name, p in chunk.named_parameters():
                value = values[name].to(device=p.device, dtype=torch.float32)
                if key == "fp32":
                    safe_set_full_fp32_param(p, value)
                else:
                    safe_set_full_optimizer_state(p, value, key)
