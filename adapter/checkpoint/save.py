"""Save the live model as an InternEvo checkpoint folder, from inside a training run.

Every (tensor, pipeline) rank of data-parallel rank 0 writes its own ``model_tp{t}_pp{p}.pt`` in
InternEvo's layout (``checkpoint.internevo``), so InternEvo and ``internlm-ckpt`` read the folder. The log
rank then writes ``model_config.pt`` (a plain dict) and, last, after a barrier, InternEvo's completion
marker ``{step}.step``: a folder without its marker is incomplete. Each file is written to a temporary
name and renamed, so a crash never leaves a truncated file under a real name.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from adapter.checkpoint.internevo import model_config_dict, shard_state_dict
from adapter.config.errors import ConfigError
from adapter.config.schema import InternLMConfig
from adapter.runtime.layout import ParallelLayout


def local_path(folder: str) -> Path:
    """InternEvo's ``local:/path`` (or a bare path); object-store prefixes are refused with a clear error."""
    backend, _, path = folder.partition(":") if ":" in folder else ("local", "", folder)
    if backend != "local":
        raise ConfigError("ckpt.save_ckpt_folder", f"{folder!r}: only local: folders are supported by this version")
    return Path(path)


def atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(cfg: InternLMConfig, layout: ParallelLayout, chunks: list[torch.nn.Module], step: int) -> Path:
    """Write ``<save_ckpt_folder>/<step>/``; collective over all ranks. Returns the folder."""
    from megatron.core import parallel_state as ps

    from adapter.model.mapping import logical_from_chunk, model_state

    folder = local_path(cfg.ckpt.save_ckpt_folder) / str(step)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    logical: dict[str, torch.Tensor] = {}
    for vp, chunk in enumerate(chunks):
        mine = {k: v.detach().cpu() for k, v in model_state(chunk).items()}
        shards = [None] * layout.tp
        dist.all_gather_object(shards, mine, group=ps.get_tensor_model_parallel_group())
        logical.update(logical_from_chunk(shards, cfg.model, layout, pp_rank, vp))
    if ps.get_data_parallel_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_save(shard_state_dict(logical, cfg.model, layout, tp_rank, pp_rank),
                    folder / f"model_tp{tp_rank}_pp{pp_rank}.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        atomic_save(model_config_dict(cfg.model), folder / "model_config.pt")
        atomic_save({"step": step}, folder / f"{step}.step")
    dist.barrier()
    return folder
