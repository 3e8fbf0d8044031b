"""Hugging Face folders: ``config.json`` plus safetensors, sharded with an index past a size threshold.

The tensor mapping itself (InternEvo's logical names and fused qkv ⇄ ``LlamaForCausalLM``) is in
``checkpoint.hf``, writing is ``stream_convert``; this module reads the files and recovers the model sizes from
``config.json`` (transformers' Llama, or InternLM2's official remote-code ``InternLM2ForCausalLM``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from adapter.checkpoint.hf import hf_to_internevo
from adapter.checkpoint.read_internevo import CheckpointError
from adapter.config.schema import ModelConfig

INDEX = "model.safetensors.index.json"


def _model_from_config(cfg: dict, source: str) -> ModelConfig:
    from adapter.config.normalize import normalize_model

    official = "InternLM2ForCausalLM" in cfg.get("architectures", [])
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    bias = cfg.get("bias", False) if official else cfg.get("attention_bias", False)
    internlm1 = not official and bias and kv == heads
    hidden, ffn = cfg["hidden_size"], cfg["intermediate_size"]
    dtype = {"bfloat16": "torch.bfloat16", "float16": "torch.float16"}.get(
        cfg.get("torch_dtype") or cfg.get("dtype") or "float32", "torch.float32")
    model = {
        "num_layers": cfg["num_hidden_layers"], "hidden_size": hidden, "num_attention_heads": heads,
        "vocab_size": cfg["vocab_size"], "mlp_ratio": ffn / hidden, "dtype": dtype,
        "layer_norm_epsilon": cfg.get("rms_norm_eps", 1e-6), "rope_base": cfg.get("rope_theta", 10000.0),
        "max_position_embeddings": cfg.get("max_position_embeddings", 2048),
    }
    if not internlm1:
        model.update(num_kv_attention_heads=kv, no_bias=not bias)
    result = normalize_model("INTERNLM" if internlm1 else "INTERNLM2_PUBLIC", model, source)
    if result.ffn_hidden_size != ffn:
        raise CheckpointError(f"{source}: intermediate_size {ffn} does not follow InternEvo's MLP rule "
                              f"(hidden {hidden} × ratio gives {result.ffn_hidden_size}); pass --config")
    return result


def read_hf(folder: Path, model: Optional[ModelConfig] = None) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    config_path = folder / "config.json"
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: cannot be read: {exc}") from exc
    if model is None:
        model = _model_from_config(cfg, str(config_path))
    if (folder / INDEX).exists():
        index = json.loads((folder / INDEX).read_text())
        files = sorted(set(index["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(folder / name))
        except Exception as exc:
            raise CheckpointError(f"{folder / name}: cannot be read as safetensors ({exc})") from exc
    generation = "hf-internlm2-official" if any(k.startswith("model.tok_embeddings") for k in tensors) else "hf-llama"
    try:
        logical = hf_to_internevo(tensors, model)
    except ValueError as exc:
        raise CheckpointError(f"{folder}: {exc}") from exc
    return model, logical, generation

