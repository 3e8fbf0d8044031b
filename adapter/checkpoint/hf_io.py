"""Hugging Face folders: ``config.json`` plus safetensors, sharded with an index past a size threshold.

The tensor mapping itself (InternEvo's logical names and fused qkv ⇄ ``LlamaForCausalLM``) is in
``checkpoint.hf``, writing is ``stream_convert``; this module reads the files and recovers the model sizes from
``config.json`` (transformers' Llama, or InternLM2's official remote-code ``InternLM2ForCausalLM``).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from adapter.checkpoint.hf import IGNORED_SUFFIXES, hf_to_internevo
from adapter.checkpoint.memory import empty_huge
from adapter.checkpoint.stream_write import SAFETENSORS_DTYPES
from adapter.checkpoint.unit_source import UnitSource
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


def read_hf(folder: Path, model: Optional[ModelConfig] = None) -> tuple[ModelConfig, "HFTensors", str]:
    """The model sizes (from ``config.json`` unless given) and the folder's logical tensors, read lazily."""
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
    tensors = HFTensors(folder, files, model)
    return model, tensors, tensors.generation


_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class _Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Byte offset of the tensor's data in the file."""


class HFTensors(UnitSource):
    """The logical tensors of a Hugging Face folder, read one model unit (a layer) at a time.

    The safetensors headers give every tensor's dtype, shape and file offset; keys and shapes are checked
    against the model up front (``hf_to_internevo`` on ``meta`` tensors). A unit's HF tensors are read with
    plain file reads (nothing stays mapped) and mapped with ``hf_to_internevo``, the unit's tensors real
    and every other one ``meta``."""

    def __init__(self, folder: Path, files: list[str], model: ModelConfig):
        self.entries: dict[str, _Entry] = {}
        for name in files:
            self.entries.update(_read_header(folder / name))
        self.hf_meta = {k: torch.empty(e.shape, dtype=e.dtype, device="meta") for k, e in self.entries.items()}
        self.generation = "hf-internlm2-official" if any(k.startswith("model.tok_embeddings") for k in self.hf_meta) \
            else "hf-llama"
        try:
            super().__init__(model, hf_to_internevo(self.hf_meta, model))
        except ValueError as exc:
            raise CheckpointError(f"{folder}: {exc}") from exc
        last = model.num_layers + 1
        self.hf_keys: list[list[str]] = [[] for _ in range(last + 1)]
        embedding = {"model.embed_tokens.weight", "model.tok_embeddings.weight"}
        for key in self.hf_meta:
            layer = _LAYER.search(key)
            self.hf_keys[1 + int(layer[1]) if layer else 0 if key in embedding else last].append(key)

    def _read_unit(self, unit: int) -> dict[str, torch.Tensor]:
        view = dict(self.hf_meta)
        view.update({k: self._read(k) for k in self.hf_keys[unit] if not k.endswith(IGNORED_SUFFIXES)})
        return {k: v for k, v in hf_to_internevo(view, self.model).items() if v.device.type != "meta"}

    def _read(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        t = empty_huge(e.shape, e.dtype)
        nbytes = t.numel() * t.element_size()
        with open(e.path, "rb") as f:
            f.seek(e.offset)
            got = f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy())) if nbytes else 0
        if got != nbytes:
            raise CheckpointError(f"{e.path}: tensor {key} is truncated ({got} of {nbytes} bytes)")
        return t


def _read_header(path: Path) -> dict[str, _Entry]:
    """A safetensors file's tensors: dtype, shape and absolute data offset, from its JSON header."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        file_size = path.stat().st_size
        out = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if 8 + size + end > file_size:
                raise ValueError(f"tensor {key} ends past the end of the file")
            out[key] = _Entry(path, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + begin)
        return out
    except (OSError, ValueError, KeyError, struct.error, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({type(exc).__name__}: {exc})") from exc
