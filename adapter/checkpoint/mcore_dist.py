"""megatron-core's distributed checkpoint (``torch_dist``) of the adapter's model.

A ``torch_dist`` checkpoint stores every tensor with its global shape and offsets, so megatron-core's own
``dist_checkpointing.load`` reads it back at any tensor/pipeline/virtual-pipeline layout. The bridge
therefore writes it from a single rank holding the whole model (one process, gloo; memory = one copy of
the weights) and reads it the same way. ``internlm_model.json`` beside megatron's files records the model
sizes (in InternEvo's keys), which the checkpoint itself does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from adapter.checkpoint.internevo import model_config_dict
from adapter.config.schema import ModelConfig

MODEL_JSON = "internlm_model.json"


def _single_rank_chunk(model: ModelConfig):
    from adapter.config import RawConfig, normalize, validate
    from adapter.config.to_mcore import model_options, transformer_config
    from adapter.model.build import build_model_chunks
    from adapter.runtime.dist import ensure_single_process_env, init_distributed

    section = {**model_config_dict(model), "num_chunks": 1, "checkpoint": 0.0}
    raw = RawConfig({"model_type": "INTERNLM" if model.family == "internlm1" else "INTERNLM2_PUBLIC",
                     "model": section, "adam": {"lr": 0.0}, "ckpt": {"enable_save_ckpt": False},
                     "data": {"seq_len": model.max_position_embeddings, "micro_bsz": 1, "total_steps": 1}},
                    "<checkpoint>", {})
    cfg = normalize(raw)
    layout = validate(cfg, 1)
    ensure_single_process_env()
    init_distributed(layout)
    config = transformer_config(cfg, layout, use_cpu_initialization=True)
    return layout, build_model_chunks(config, model_options(cfg))[0]


def write_torch_dist(logical: Mapping[str, torch.Tensor], model: ModelConfig, folder: Path) -> None:
    from megatron.core import dist_checkpointing

    from adapter.model.mapping import chunk_state_dict

    layout, chunk = _single_rank_chunk(model)
    chunk.load_state_dict(chunk_state_dict(logical, model, layout, 0, 0, 0), strict=False)
    dist_checkpointing.save({"model": chunk.sharded_state_dict()}, str(folder))
    (folder / MODEL_JSON).write_text(json.dumps({"family": model.family, "model": model_config_dict(model)}, indent=2))


def read_torch_dist(folder: Path, model: ModelConfig | None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from megatron.core import dist_checkpointing

    from adapter.config.normalize import normalize_model
    from adapter.model.mapping import logical_from_chunk, model_state

    if model is None:
        meta = json.loads((folder / MODEL_JSON).read_text())
        model = normalize_model("INTERNLM" if meta["family"] == "internlm1" else "INTERNLM2_PUBLIC", meta["model"],
                                str(folder / MODEL_JSON))
    layout, chunk = _single_rank_chunk(model)
    loaded = dist_checkpointing.load({"model": chunk.sharded_state_dict()}, str(folder))
    chunk.load_state_dict(loaded["model"], strict=False)
    return model, logical_from_chunk([model_state(chunk)], model, layout, 0, 0)
