"""Hugging Face folders: InternEvo's logical state dict ⇄ ``LlamaForCausalLM`` (and InternLM2's official naming).

Every family loads into transformers' own Llama, so an exported model needs no ``trust_remote_code``:

* InternLM1 is Llama with biases on q/k/v/o (``attention_bias=True``; its MLP has none, ``mlp_bias=False``).
* InternLM2 is Llama with grouped-query attention once its fused ``wqkv`` is unpacked; its q/k/v/o biases
  exist exactly when ``no_bias`` is False, which is again ``attention_bias``.
* LLAMA2 (InternEvo's Llama) is Llama with q/k/v/o biases unless ``no_bias``.

All use rotate-half RoPE (InternEvo's default ``qk_interleaved=False``) with ``rope_theta = rope_base``,
the same convention as HF Llama, so the q/k rows need no permutation. ``qk_interleaved=True`` models (GPT-J
pairs) and LayerNorm models do not map onto Llama as-is and are refused rather than silently mis-exported.

The names and fused qkv layouts are the families' tensor tables (``adapter.families``): HF Llama's for
export, plus InternLM2's published remote-code naming (``InternLM2ForCausalLM``: ``attention.wqkv``, the
same grouped layout as InternEvo's) on import.

Every conversion only renames, slices, reshapes and concatenates: no arithmetic, dtypes kept, so
``hf_to_internevo(internevo_to_hf(sd, m), m)`` equals ``sd`` bit for bit. Inputs are checked key by key and
shape by shape up front, and a ``ValueError`` names the first offending tensor: a checkpoint that is
half-converted or built for another size should fail here, not as a shape error deep inside a load.

A folder is ``config.json`` plus safetensors, sharded with an index past a size threshold; the model sizes
and family are recovered from ``config.json`` (transformers' Llama, or a family's published remote code).
"""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch

from adapter.checkpoint.errors import CheckpointError
from adapter.checkpoint.io.lazy import UnitSource
from adapter.checkpoint.io.memory import empty_huge
from adapter.checkpoint.io.stream_write import SAFETENSORS_DTYPES, SafetensorsWriter
from adapter.checkpoint.stream_convert import FileGroup
from adapter.config.schema import ModelConfig
from adapter.families import FAMILIES, Family, logical_table
from adapter.model.mapping import logical_shapes
from adapter.weights import atoms
from adapter.weights.table import Table, Unit, whole_shape, whole_unit

NAME = "hf"
HELP = "transformers LlamaForCausalLM safetensors (no remote code)"
NEEDS_LAYOUT = False

_TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
#: Buffers that older transformers / remote code saved; they are recomputed from the config, so they are
#: skipped on import instead of being reported as unexpected.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
#: ``config.json`` key naming the InternEvo model type an export came from (transformers keeps unknown keys),
#: so that importing it gives back the same family: an InternLM1 and a LLAMA2 with biases are the same Llama.
FAMILY_KEY = "internevo_model_type"


def hf_config(model: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` dict that makes transformers' ``LlamaForCausalLM`` compute this model.

    ``rope_theta`` is written both flat (transformers 4.x, and what ``read_hf`` reads back) and inside
    ``rope_parameters`` (transformers 5.x); ``torch_dtype`` and ``dtype`` likewise. InternLM1 has no GQA, so
    ``num_key_value_heads == num_attention_heads`` there. Dynamic-NTK RoPE (InternLM1 only) becomes
    ``rope_type="dynamic"`` with factor 1: InternEvo's ``DynamicNTKScalingRotaryEmbedding`` uses the same
    base-rescaling formula and only departs from plain RoPE past ``max_position_embeddings``.
    """
    _check_supported(model)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(model.rope_base)}
    if model.use_dynamic_ntk_rope:
        rope = {"rope_type": "dynamic", "factor": 1.0, "rope_theta": float(model.rope_base)}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        FAMILY_KEY: FAMILIES[model.family].model_type,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_kv_attention_heads,
        "head_dim": model.head_dim,
        "vocab_size": model.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": model.layer_norm_epsilon,
        "rope_theta": float(model.rope_base),
        "rope_scaling": None if rope["rope_type"] == "default" else dict(rope),
        "rope_parameters": rope,
        "max_position_embeddings": model.max_position_embeddings,
        "attention_bias": model.qkv_bias,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": _TORCH_DTYPE[model.dtype],
        "dtype": _TORCH_DTYPE[model.dtype],
    }


def export_table(model: ModelConfig) -> Table:
    """The HF table exports write (transformers' Llama for every family)."""
    return FAMILIES[model.family].hf[0](model)


def internevo_to_hf(state_dict: Mapping[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Logical InternEvo tensors → a ``LlamaForCausalLM`` state dict (``load_state_dict(strict=True)``-ready)."""
    return dict(iter_hf_tensors(state_dict, model))


def iter_hf_tensors(state_dict: Mapping[str, torch.Tensor], model: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """``internevo_to_hf`` one tensor at a time in Llama's module order, reading each logical tensor only
    when its unit comes, so a lazily read source is converted without holding the model. Key sets are
    checked first; each shape as the tensor is read. A tensor cut out of a fused one is copied, so that each
    owns its storage (safetensors refuses tensors that share memory)."""
    _check_supported(model)
    expected = logical_shapes(model)
    _check(state_dict, expected, "InternEvo state dict", shapes=False)

    def get(key: str) -> torch.Tensor:
        value = state_dict[key]
        if tuple(value.shape) != expected[key]:
            raise ValueError(f"InternEvo state dict: tensor {key} has shape {tuple(value.shape)}, "
                             f"expected {expected[key]}")
        return value

    for unit in range(atoms.num_units(model)):
        source = whole_unit(model, unit, logical_table(model), get)
        for key, _, piece in source.convert(export_table(model), 1, 0):
            owns = piece.untyped_storage().nbytes() == piece.numel() * piece.element_size()
            yield key, piece if owns or piece.device.type == "meta" else piece.clone()


def hf_to_internevo(state_dict: Mapping[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """A ``LlamaForCausalLM`` state dict, or one in another of the family's HF namings (InternLM2's
    published ``InternLM2ForCausalLM``), → logical InternEvo tensors, in InternEvo's file order."""
    _check_supported(model)
    table = import_table(state_dict, model)
    tensors = {k: v for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIXES)}
    _check(tensors, {key: whole_shape(model, s) for key, s in table.all_keys(model)}, "Hugging Face state dict")
    out: dict[str, torch.Tensor] = {}
    for unit in range(atoms.num_units(model)):
        source = whole_unit(model, unit, table, tensors.__getitem__)
        out.update((key, piece) for key, _, piece in source.convert(logical_table(model), 1, 0))
    return out


def import_table(keys: Iterable[str], model: ModelConfig) -> Table:
    """Which of the family's HF tables names these tensors (told apart by the embedding's name); a naming
    that belongs to another family is refused."""
    keys = set(keys)
    for make in FAMILIES[model.family].hf:
        table = make(model)
        if table.embedding[0].name in keys:
            return table
    for other in FAMILIES.values():
        for make in other.hf[1:]:
            if make(model).embedding[0].name in keys:
                raise ValueError(f"Hugging Face state dict uses {other.hf_architecture}'s official naming "
                                 f"({make(model).embedding[0].name}) but the model family is {model.family}")
    return export_table(model)


def _check_supported(model: ModelConfig) -> None:
    """Refuse models whose math Llama does not reproduce (rather than export wrong weights silently)."""
    if model.norm_type != "rmsnorm":
        raise ValueError(f"norm_type {model.norm_type!r}: only RMSNorm models map onto transformers' Llama")
    if model.qk_interleaved:
        raise ValueError("qk_interleaved=True (GPT-J style RoPE) needs a q/k row permutation that this "
                         "mapping does not do; only rotate-half models map onto transformers' Llama")
    if model.num_attention_heads % model.num_kv_attention_heads:
        raise ValueError(f"num_attention_heads {model.num_attention_heads} is not a multiple of "
                         f"num_kv_attention_heads {model.num_kv_attention_heads}")


def _first(keys: list[str]) -> str:
    return keys[0] + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")


def _check(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], what: str,
           shapes: bool = True) -> None:
    """Raise ``ValueError`` naming the first missing, unexpected or (with ``shapes``) wrongly shaped tensor."""
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ValueError(f"{what}: missing tensor {_first(missing)}")
    extra = [k for k in tensors if k not in expected]
    if extra:
        raise ValueError(f"{what}: unexpected tensor {_first(extra)}")
    for key, shape in expected.items() if shapes else ():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{what}: tensor {key} has shape {tuple(tensors[key].shape)}, expected {shape}")


INDEX = "model.safetensors.index.json"


def _family_from_config(cfg: dict) -> Family:
    """The family of an HF ``config.json``: a family's published remote-code architecture, else the
    InternEvo model type our exports record, else Llama (InternEvo's ``LLAMA2``)."""
    architectures = cfg.get("architectures") or []
    for family in FAMILIES.values():
        if family.hf_architecture in architectures:
            return family
    model_type = cfg.get(FAMILY_KEY)
    return next((f for f in FAMILIES.values() if f.model_type == model_type), FAMILIES["llama2"])


def _rope(cfg: dict, source: str) -> tuple[float, bool]:
    """``rope_theta`` and whether the RoPE is InternEvo's dynamic NTK (``rope_type="dynamic"``, factor 1).

    transformers 4 writes ``rope_theta`` flat and the scaling in ``rope_scaling``; transformers 5 writes both
    in ``rope_parameters``. Any other scaling (linear, YaRN, Llama 3…) has no InternEvo counterpart: reading
    it as plain RoPE would change the model silently, so it is refused.
    """
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "dynamic") or float(scaling.get("factor", 1.0)) != 1.0:
        raise CheckpointError(f"{source}: RoPE scaling {kind!r} (factor {scaling.get('factor', 1.0)}) has no "
                              "InternEvo counterpart; only plain RoPE and dynamic NTK with factor 1 are read")
    return cfg.get("rope_theta") or params.get("rope_theta", 10000.0), kind == "dynamic"


def _model_from_config(cfg: dict, source: str) -> ModelConfig:
    from adapter.config.normalize import normalize_model

    family = _family_from_config(cfg)
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    bias = cfg.get("bias", cfg.get("attention_bias", False))
    rope, dynamic = _rope(cfg, source)
    hidden, ffn = cfg["hidden_size"], cfg["intermediate_size"]
    dtype = {"bfloat16": "torch.bfloat16", "float16": "torch.float16"}.get(
        cfg.get("torch_dtype") or cfg.get("dtype") or "float32", "torch.float32")
    model = {
        "num_layers": cfg["num_hidden_layers"], "hidden_size": hidden, "num_attention_heads": heads,
        "vocab_size": cfg["vocab_size"], "mlp_ratio": ffn / hidden, "dtype": dtype,
        "layer_norm_epsilon": cfg.get("rms_norm_eps", 1e-6), "rope_base": rope,
        "max_position_embeddings": cfg.get("max_position_embeddings", 2048),
    }
    if family.gqa:
        model.update(num_kv_attention_heads=kv, no_bias=not bias)
    if dynamic:
        model["use_dynamic_ntk_rope"] = True  # so that the config rules refuse it by name, as for a config
    result = normalize_model(family.model_type, model, source)
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
    tensors = HFTensors(folder, files, model, tied=bool(cfg.get("tie_word_embeddings")))
    return model, tensors, tensors.generation


_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


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
    plain file reads (nothing stays mapped) and converted through the family's tables. With
    ``tie_word_embeddings`` and no ``lm_head.weight`` the head is the embedding, as transformers ties it."""

    def __init__(self, folder: Path, files: list[str], model: ModelConfig, tied: bool = False):
        self.entries: dict[str, _Entry] = {}
        for name in files:
            self.entries.update(_read_header(folder / name))
        for key, e in self.entries.items():
            if not e.dtype.is_floating_point:
                raise CheckpointError(f"{e.path}: {key} is {e.dtype}: a weight must be floating point")
        self.table = import_table(self.entries, model)
        head, embedding = self.table.final[-1].name, self.table.embedding[0].name
        if tied and head not in self.entries and embedding in self.entries:
            self.entries[head] = self.entries[embedding]
        hf_meta = {k: torch.empty(e.shape, dtype=e.dtype, device="meta") for k, e in self.entries.items()}
        official = FAMILIES[model.family].hf_architecture
        self.generation = "hf-llama" if self.table == export_table(model) else f"hf-{official} (published naming)"
        try:
            super().__init__(model, hf_to_internevo(hf_meta, model))
        except ValueError as exc:
            raise CheckpointError(f"{folder}: {exc}") from exc

    def _read_unit(self, unit: int) -> dict[str, torch.Tensor]:
        source = whole_unit(self.model, unit, self.table, self._read)
        return {key: piece for key, _, piece in source.convert(logical_table(self.model), 1, 0)}

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
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > file_size - 8:
                raise ValueError(f"its header length {size} is past the end of the file ({file_size} bytes)")
            header = json.loads(f.read(size))
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


#: Files a transformers tokenizer is saved as (``save_pretrained``), and remote-code tokenizer modules.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenization_*.py")


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer files in ``folder`` (a tokenizer saved with transformers, or an HF model folder)."""
    found = sorted({p for pattern in TOKENIZER_FILES for p in folder.glob(pattern) if p.is_file()})
    if not found:
        raise CheckpointError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return found


# -- the format's verbs (``adapter.checkpoint.formats``) -------------------------------------------------------
def detect(names: set[str]) -> bool:
    return "config.json" in names and any(n.endswith(".safetensors") for n in names)


def open_folder(path: Path, model: Optional[ModelConfig]) -> tuple[ModelConfig, None, HFTensors, str]:
    model, tensors, generation = read_hf(path, model)
    return model, None, tensors, generation


def planned_files(layout: Any) -> list[str]:
    return ["config.json", "model*.safetensors (an index past the shard size)"]


def file_groups(model: ModelConfig, layout: Any, meta: Mapping[str, torch.Tensor], shard_bytes: int) -> list[FileGroup]:
    """One group holding every shard; tensors are assigned to shards in order, at most ``shard_bytes`` each
    (the names follow transformers: one ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``)."""
    _check_supported(model)
    shard_of: dict[str, int] = {}
    size, shard = 0, 0
    for unit in range(atoms.num_units(model)):
        for key, _, t in whole_unit(model, unit, logical_table(model), meta.__getitem__).convert(export_table(model), 1, 0):
            nbytes = t.numel() * t.element_size()
            if shard_of and size + nbytes > shard_bytes:
                shard, size = shard + 1, 0
            shard_of[key] = shard
            size += nbytes
    count = shard + 1
    names = (["model.safetensors"] if count == 1 else
             [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)])

    def entries(unit: Unit) -> Iterator[tuple[int, str, torch.Tensor]]:
        for key, _, piece in unit.convert(export_table(model), 1, 0):
            yield shard_of[key], key, piece

    return [FileGroup(names, list(range(atoms.num_units(model))), entries, OrderedDict,
                      lambda path, skeleton: SafetensorsWriter(path, skeleton, {"format": "pt"}))]


def finish(folder: Path, model: ModelConfig, groups: list[FileGroup], meta: Mapping[str, torch.Tensor]) -> None:
    """``config.json``, and the index when there is more than one shard."""
    (folder / "config.json").write_text(json.dumps(hf_config(model), indent=2) + "\n")
    group = groups[0]
    if len(group.names) > 1:
        shards = group.skeletons(model, meta)
        weight_map = {key: name for name, shard in zip(group.names, shards) for key in shard}
        total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX).write_text(json.dumps(index, indent=2))
