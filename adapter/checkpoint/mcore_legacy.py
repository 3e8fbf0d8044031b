"""Megatron-LM's legacy per-rank checkpoint layout for the adapter's megatron-core model.

``<root>/iter_{N:07d}/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt`` holds ``{"model": state_dict}`` (or
``model0``, ``model1``, ... one per virtual stage), ``"iteration"`` and ``"checkpoint_version"``, and in
files Megatron-LM wrote also ``args``, RNG and optimizer states (read through an allow-list, not used);
``<root>/latest_checkpointed_iteration.txt`` names the iteration. The pipeline suffix is present only when
the pipeline size is above 1, as Megatron-LM writes it. State-dict keys are megatron-core's
(``adapter.model.mapping.MCORE_NAMES``); Transformer Engine's fused names are read too
(``TE_NAMES``). Writing is ``stream_convert.mcore_legacy_groups``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from adapter.checkpoint.memory import drop_pages
from adapter.checkpoint.read_internevo import CheckpointError, open_model_file
from adapter.checkpoint.unit_source import UnitSource
from adapter.config.schema import ModelConfig
from adapter.model.mapping import expected_chunk, local_spec_name, logical_from_chunk, logical_keys, mcore_unit
from adapter.runtime.layout import ParallelLayout, partition_uniform

RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")


def read_mcore_legacy(root: Path, model: ModelConfig) -> tuple[ParallelLayout, "LegacyTensors"]:
    """The saved layout and the logical tensors (read lazily) of the newest iteration under ``root``.

    The layer split is not stored in these files; it is taken to be InternEvo's partition, which is what
    the adapter's model uses (an even split when the layers divide evenly)."""
    latest = root / "latest_checkpointed_iteration.txt"
    folders = [root / f"iter_{int(latest.read_text().strip()):07d}"] if latest.exists() else sorted(root.glob("iter_*"))
    if not folders or not folders[-1].is_dir():
        raise CheckpointError(f"{root}: no iter_* folder")
    ranks = {}
    for d in folders[-1].iterdir():
        m = RANK_DIR.match(d.name)
        if m:
            ranks[(int(m[1]), int(m[2] or 0))] = d / "model_optim_rng.pt"
    if not ranks:
        raise CheckpointError(f"{folders[-1]}: no mp_rank_* folders")
    tp = max(t for t, _ in ranks) + 1
    pp = max(p for _, p in ranks) + 1
    missing = [rank_dir(t, p, pp) for t in range(tp) for p in range(pp) if (t, p) not in ranks]
    if missing:
        raise CheckpointError(f"{folders[-1]}: missing {', '.join(missing)}")
    files = {rank: open_model_file(path, megatron=True) for rank, path in ranks.items()}  # memory-mapped
    vpp = 1 if "model" in files[(0, 0)] else sum(1 for k in files[(0, 0)] if k.startswith("model") and k[5:].isdigit())
    layout = ParallelLayout(tp=tp, pp=pp, vpp=vpp, dp=None, zero1=None, sequence_parallel=False,
                            stages=tuple(tuple(s) for s in partition_uniform(model.num_layers, pp, vpp)))
    chunks = {}
    for p in range(pp):
        for vp in range(vpp):
            entry = "model" if vpp == 1 else f"model{vp}"
            shards = []
            for t in range(tp):
                if entry not in files[(t, p)]:
                    raise CheckpointError(f"{ranks[(t, p)]}: no {entry!r} entry")
                shards.append(_local_names(files[(t, p)][entry]))
                _check(shards[-1], expected_chunk(model, layout, p, vp, t), f"{ranks[(t, p)]} [{entry!r}]")
            chunks[(p, vp)] = shards
    renamed = any(local_spec_name(k) not in (k, None) for k in files[(0, 0)]["model" if vpp == 1 else "model0"])
    return layout, LegacyTensors(chunks, model, layout, renamed)


def _check(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    """Refuse a missing, unexpected or wrongly shaped tensor, naming it (the layer split is InternEvo's)."""
    for key, want in expected.items():
        if key not in state:
            raise CheckpointError(f"{where}: missing tensor {key}")
        if state[key].shape != want.shape:
            raise CheckpointError(f"{where}: tensor {key} has shape {tuple(state[key].shape)}, expected "
                                  f"{tuple(want.shape)} for this model and layout")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor {unexpected[0]}")


def _local_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One chunk's tensors under the local spec's names: Transformer Engine's fused pre-norm names (what
    Megatron-LM trains with on GPUs) renamed, ``_extra_state`` entries dropped."""
    out = {}
    for key, value in state.items():
        name = local_spec_name(key)
        if name is not None:
            out[name] = value
    return out


class LegacyTensors(UnitSource):
    """The logical tensors of Megatron-legacy files, one model unit (a layer) at a time.

    The files are memory-mapped once; a unit is computed by ``logical_from_chunk`` on its chunk with that
    unit's tensors real and every other one a ``meta`` placeholder, and the source pages it read are dropped."""

    def __init__(self, chunks: dict[tuple[int, int], list[dict[str, torch.Tensor]]], model: ModelConfig,
                 layout: ParallelLayout, renamed: bool = False):
        self.chunks, self.layout = chunks, layout
        self.renamed = renamed
        """Whether the files use Transformer Engine's names."""
        self.meta_chunks = {c: [{k: v.to("meta") for k, v in sd.items()} for sd in shards]
                            for c, shards in chunks.items()}
        meta = {}
        for (p, vp), shards in self.meta_chunks.items():
            meta.update({k: (v, (p, vp)) for k, v in logical_from_chunk(shards, model, layout, p, vp).items()})
        super().__init__(model, {k: meta[k][0] for k in logical_keys(model)})
        self.chunk_of = {self.unit_of[k]: chunk for k, (_, chunk) in meta.items()}

    def _read_unit(self, unit: int) -> dict[str, torch.Tensor]:
        p, vp = self.chunk_of[unit]
        start = self.layout.stages[p][vp][0]
        read: list[torch.Tensor] = []
        shards = []
        for sd, meta in zip(self.chunks[(p, vp)], self.meta_chunks[(p, vp)]):
            mine = {k: v for k, v in sd.items() if mcore_unit(k, start, self.model.num_layers) == unit}
            read += mine.values()
            shards.append({**meta, **mine})
        out = logical_from_chunk(shards, self.model, self.layout, p, vp)
        for t in read:  # every result is a copy
            drop_pages(t)
        return {k: v for k, v in out.items() if v.device.type != "meta"}
