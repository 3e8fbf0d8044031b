"""Render every translation of one config as files: the job behind ``internlm-config convert``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from adapter.atomic import atomic_directory
from adapter.config.report import report_json, report_markdown
from adapter.config.schema import InternLMConfig
from adapter.config.to_deepspeed import deepspeed_config
from adapter.config.to_megatron_args import megatron_args_text
from adapter.runtime.layout import ParallelLayout

def render(cfg: InternLMConfig, layout: ParallelLayout) -> dict[str, str]:
    """File name → text for every output. Builds the real ``TransformerConfig`` to validate it."""
    from dataclasses import asdict

    import megatron.core

    from adapter.config.to_mcore import model_options, plain_fields, transformer_config

    transformer_config(cfg, layout)  # megatron-core's own validation; raises ConfigError
    mcore = {
        "transformer_config": plain_fields(cfg, layout),
        "model": asdict(model_options(cfg)),
        "parallel": {
            "tensor_model_parallel_size": layout.tp,
            "pipeline_model_parallel_size": layout.pp,
            "virtual_pipeline_model_parallel_size": layout.vpp,
            "data_parallel_size": layout.dp,
            "world_size": layout.world_size,
            "sequence_parallel": layout.sequence_parallel,
            "layers": [[list(chunk) for chunk in stage] for stage in layout.stages],
        },
    }
    header = (f"# megatron-core {megatron.core.__version__} TransformerConfig translated from {cfg.source}\n"
              "# parallel.layers[pp_rank][chunk] = [first_layer, end_layer), InternEvo's partition_uniform\n")
    return {
        "ds_config.json": json.dumps(deepspeed_config(cfg, layout), indent=2) + "\n",
        "transformer_config.yaml": header + yaml.safe_dump(mcore, sort_keys=False),
        "megatron_args.txt": megatron_args_text(cfg, layout),
        "report.md": report_markdown(cfg, layout),
        "report.json": report_json(cfg, layout),
    }


def write_outputs(cfg: InternLMConfig, layout: ParallelLayout, out_dir: str | os.PathLike, *,
                  overwrite: bool = False) -> list[Path]:
    """Write every output into ``out_dir`` atomically; returns the written paths. ``out_dir`` may not hold
    the config (``atomic.OverlapError``) and is replaced only when this package wrote it."""
    files = render(cfg, layout)
    with atomic_directory(out_dir, overwrite=overwrite, inputs=[cfg.source]) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
    return [Path(out_dir) / name for name in files]
