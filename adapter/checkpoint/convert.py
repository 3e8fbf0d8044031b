"""Open, convert and compare checkpoints in any supported format, through the logical state dict.

Formats are plug-ins (``adapter.checkpoint.formats``): ``internevo`` (``model_tp{t}_pp{p}.pt`` folders),
``mcore`` (megatron-core's ``torch_dist`` distributed checkpoint of the adapter's model, loadable at any
layout), ``mcore-legacy`` (Megatron-LM's per-rank ``iter_*/mp_rank_*`` layout) and ``hf`` (transformers
``LlamaForCausalLM`` safetensors; InternLM2's official naming is read too). Every conversion goes source →
InternEvo's logical (tp=1) tensors → target, using only slicing, concatenation and row reordering, so round
trips are bit-exact (a ``--dtype`` cast aside). Outputs are written into a temporary folder next to the target
and renamed at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import torch

from adapter.atomic import NoSpaceError, atomic_directory, require_space
from adapter.checkpoint import formats
from adapter.checkpoint.errors import CheckpointError
from adapter.checkpoint.io.safe_load import load_metadata
from adapter.config.schema import ModelConfig
from adapter.runtime.layout import ParallelLayout, partition_uniform
from adapter.weights.stored import same_bytes

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Checkpoint:
    """A checkpoint opened for reading: its format, model, saved layout (None for hf) and logical tensors."""

    path: Path
    format: str
    model: ModelConfig
    layout: Optional[ParallelLayout]
    tensors: Mapping[str, torch.Tensor]
    """Read on access, one model unit at a time (``io.lazy.UnitSource``; InternEvo folders tensor by tensor)."""
    generation: str = ""
    """Key-naming generation, e.g. ``internevo`` or ``internevo-2023`` (w2/w3 swapped), ``hf-llama``."""


def detect_format(path: Path) -> str:
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    found = formats.detect({p.name for p in path.iterdir()}) if path.is_dir() else None
    if found is None:
        raise CheckpointError(f"{path}: not a checkpoint folder of a known format ({', '.join(formats.REGISTRY)})")
    return found.NAME


def open_checkpoint(path: str | Path, model: Optional[ModelConfig] = None) -> Checkpoint:
    """Read any supported checkpoint. ``model`` (from ``--config``) supplies sizes the files cannot tell."""
    path = Path(path)
    fmt = detect_format(path)
    model, layout, tensors, generation = formats.get(fmt).open_folder(path, model)
    return Checkpoint(path, fmt, model, layout, tensors, generation)


def target_layout(model: ModelConfig, tp: int, pp: int, vpp: int) -> ParallelLayout:
    """A layout with InternEvo's layer partition; refuses sizes the model cannot be split into."""
    from adapter.config.errors import ConfigError

    heads, groups = model.num_attention_heads, model.num_kv_attention_heads
    for what, n in (("attention heads", heads), ("kv heads", groups), ("hidden size", model.hidden_size),
                    ("MLP width", model.ffn_hidden_size)):
        if n % tp:
            raise CheckpointError(f"--tp {tp} does not divide the {what} ({n})")
    if vpp > 1 and pp == 1:
        raise CheckpointError("--vpp needs --pp > 1")
    try:
        stages = partition_uniform(model.num_layers, pp, vpp)
    except ConfigError as exc:
        raise CheckpointError(f"--pp {pp} --vpp {vpp}: {exc.message}") from None
    return ParallelLayout(tp=tp, pp=pp, vpp=vpp, dp=None, zero1=None, sequence_parallel=False,
                          stages=tuple(tuple(s) for s in stages))


def planned_files(fmt: str, layout: Optional[ParallelLayout]) -> list[str]:
    return formats.get(fmt).planned_files(layout)


def write_checkpoint(src: Checkpoint, fmt: str, dst: str | Path, layout: Optional[ParallelLayout], *,
                     dtype: Optional[torch.dtype] = None, overwrite: bool = False,
                     shard_bytes: int = 2 * 1024**3, extra_files: Sequence[Path] = ()) -> Path:
    """Write ``src`` as ``fmt`` into ``dst`` atomically, one model unit at a time (``stream_convert``).
    ``shard_bytes`` bounds each HF safetensors file; ``extra_files`` (a tokenizer) are copied in beside."""
    from adapter.checkpoint.stream_convert import meta_tensors

    planned = sum(t.numel() * t.element_size() for t in meta_tensors(src.tensors, src.model, dtype).values())
    with atomic_directory(dst, overwrite=overwrite, inputs=[src.path]) as tmp:
        require_space(dst, planned)
        with disk_errors(tmp, dst):
            write_streaming(src.tensors, src.model, fmt, layout, tmp, dtype=dtype, shard_bytes=shard_bytes,
                            where=str(src.path))
        for path in extra_files:
            shutil.copyfile(path, tmp / path.name)
    return Path(dst)


@contextlib.contextmanager
def disk_errors(tmp: Path, dst: str | Path) -> Iterator[None]:
    """Writing into ``tmp`` (the temporary folder of ``dst``): torch's zip writer reports a full disk as an
    iostream ``RuntimeError``; say "no space left on ``dst``" instead, and name ``dst`` for any other."""
    try:
        yield
    except RuntimeError as exc:
        if shutil.disk_usage(tmp).free < 2**20:
            raise NoSpaceError(f"no space left on {dst}") from exc
        raise CheckpointError(f"writing {dst} failed: {exc}") from exc


def write_streaming(source: Mapping[str, torch.Tensor], model: ModelConfig, fmt: str,
                    layout: Optional[ParallelLayout], folder: Path, *, dtype: Optional[torch.dtype] = None,
                    shard_bytes: int = 2 * 1024**3, where: str = "source") -> None:
    """Write logical tensors as ``fmt`` into ``folder`` (which must exist and be empty)."""
    from adapter.checkpoint.stream_convert import meta_tensors, write_groups

    if dtype is not None:
        model = dataclasses.replace(model, dtype={v: k for k, v in DTYPES.items()}[dtype])
    target = formats.get(fmt)
    try:
        meta = meta_tensors(source, model, dtype)
        groups = target.file_groups(model, layout, meta, shard_bytes)
        write_groups(source, model, groups, meta, folder, dtype)
        target.finish(folder, model, groups, meta)
    except CheckpointError:
        raise
    except ValueError as exc:  # a tensor that does not fit the model or the target layout
        raise CheckpointError(f"{where}: {exc}") from exc


def compare(a: Checkpoint, b: Checkpoint, atol: float = 0.0) -> list[str]:
    """Differences between two checkpoints in logical form; empty when they match."""
    problems = []
    for key in sorted(set(a.tensors) ^ set(b.tensors)):
        problems.append(f"{key}: only in {'first' if key in a.tensors else 'second'}")
    for key in sorted(set(a.tensors) & set(b.tensors)):
        x, y = a.tensors[key], b.tensors[key]
        if x.shape != y.shape:
            problems.append(f"{key}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
        elif atol == 0.0:
            if x.dtype != y.dtype or not same_bytes(x, y):
                problems.append(f"{key}: differs (max |a-b| = {_max_diff(x, y):.3g}, dtypes {x.dtype} / {y.dtype})")
        else:
            diff = _max_diff(x, y)
            if not diff <= atol:  # NaN (a NaN on one side only) is a difference too
                problems.append(f"{key}: max |a-b| = {diff:.3g} > atol {atol:g}")
    return problems


def _max_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """The largest ``|x - y|``; equal values (NaN and NaN, inf and inf) count 0, a NaN against a number NaN."""
    x, y = x.float(), y.float()
    same = (x == y) | (x.isnan() & y.isnan())
    return (x - y).abs().masked_fill(same, 0).max().item() if x.numel() else 0.0


def describe(ckpt: Checkpoint, tensors: bool = False) -> dict:
    """What ``internlm-ckpt inspect`` reports, from shapes and dtypes only: no tensor data is read (every
    source tells a tensor's ``meta`` from file headers)."""
    layout = ckpt.layout
    meta = {key: ckpt.tensors.meta(key) for key in ckpt.tensors}
    info = {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "generation": ckpt.generation,
        "family": ckpt.model.family,
        "tp": layout.tp if layout else None,
        "pp": layout.pp if layout else None,
        "vpp": layout.vpp if layout else None,
        "layers": [[e - s for s, e in stage] for stage in layout.stages] if layout else None,
        "dtype": str(next(iter(meta.values())).dtype).replace("torch.", ""),
        "parameters": sum(t.numel() for t in meta.values()),
        "model": {"hidden_size": ckpt.model.hidden_size, "num_layers": ckpt.model.num_layers,
                  "num_attention_heads": ckpt.model.num_attention_heads,
                  "num_kv_attention_heads": ckpt.model.num_kv_attention_heads,
                  "vocab_size": ckpt.model.vocab_size, "ffn_hidden_size": ckpt.model.ffn_hidden_size},
    }
    info["notes"] = dtype_notes(ckpt)
    if tensors:
        info["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                           for k, v in meta.items()}
    return info


def dtype_notes(ckpt: Checkpoint) -> list[str]:
    """A note when an InternEvo folder's ``model_config.pt`` names a dtype none of its tensors has (from
    headers only). The tensors are still read as they are, but a reader trusting that file is misled; a mix
    that holds the named dtype is no contradiction (InternEvo's ``use_fp32_norm`` keeps norms in fp32 beside
    bf16 weights)."""
    config = ckpt.path / "model_config.pt"
    if ckpt.format != "internevo" or not config.is_file():
        return []
    named = load_metadata(config).get("dtype")  # InternEvo pickles a torch dtype, this adapter its name
    if isinstance(named, str):
        named = getattr(torch, named.removeprefix("torch."), None)
    held = {ckpt.tensors.meta(key).dtype for key in ckpt.tensors}
    if not isinstance(named, torch.dtype) or named in held:
        return []
    names = ", ".join(sorted(str(d).replace("torch.", "") for d in held))
    return [f"{config}: says dtype {str(named).replace('torch.', '')}, but the tensors are {names}"]


def dumps(info: dict) -> str:
    return json.dumps(info, indent=2)
