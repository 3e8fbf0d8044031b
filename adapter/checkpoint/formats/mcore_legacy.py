"""Megatron-LM's legacy per-rank checkpoint layout for the adapter's megatron-core model.

``<root>/iter_{N:07d}/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt`` holds ``{"model": state_dict}`` (or
``model0``, ``model1``, ... one per virtual stage), ``"iteration"`` and ``"checkpoint_version"``, and in
files Megatron-LM wrote also ``args``, RNG and optimizer states (read through an allow-list, not used);
``<root>/latest_checkpointed_iteration.txt`` names the iteration. The pipeline suffix is present only when
the pipeline size is above 1, as Megatron-LM writes it. State-dict keys are megatron-core's
(``adapter.weights.mcore``); Transformer Engine's fused names are read too
(``TE_NAMES``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch

from adapter.checkpoint.errors import CheckpointError
from adapter.checkpoint.io.lazy import UnitSource
from adapter.checkpoint.io.memory import drop_pages
from adapter.checkpoint.io.safe_load import open_model_file
from adapter.checkpoint.stream_convert import FileGroup
from adapter.config.schema import ModelConfig
from adapter.families import logical_table
from adapter.model.mapping import chunk_units, expected_chunk, local_spec_name, logical_shapes
from adapter.weights.mcore import mcore_table
from adapter.weights.stored import PieceError, check_pieces
from adapter.weights.table import Unit
from adapter.runtime.layout import ParallelLayout, partition_uniform

NAME = "mcore-legacy"
HELP = "Megatron-LM iter_*/mp_rank_* files at any --tp/--pp/--vpp"
NEEDS_LAYOUT = True
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
            _check_dtypes(shards, [ranks[(t, p)] for t in range(tp)], entry)
            chunks[(p, vp)] = shards
    renamed = any(local_spec_name(k) not in (k, None) for k in files[(0, 0)]["model" if vpp == 1 else "model0"])
    paths = {p: [ranks[(t, p)] for t in range(tp)] for p in range(pp)}
    return layout, LegacyTensors(chunks, model, layout, renamed, paths)


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


def _check_dtypes(shards: list[dict[str, torch.Tensor]], paths: list[Path], entry: str) -> None:
    """From headers: every tensor floating point, and of one dtype on every tensor rank (joining would cast)."""
    for key, first in shards[0].items():
        for t, state in enumerate(shards):
            try:
                check_pieces([first, state[key]] if t else [first], replicated=False)
            except PieceError as exc:
                where = [paths[0], paths[t]]
                raise CheckpointError(exc.describe(lambda i: f"{where[i]} [{entry!r}]", key)) from None


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

    The files are memory-mapped once; a unit is converted from its chunk's tensor-rank pieces through the
    tensor tables, and the source pages it read are dropped (they stay in the page cache)."""

    def __init__(self, chunks: dict[tuple[int, int], list[dict[str, torch.Tensor]]], model: ModelConfig,
                 layout: ParallelLayout, renamed: bool = False, paths: Optional[dict[int, list[Path]]] = None):
        self.chunks, self.layout = chunks, layout
        self.paths = paths or {}
        """Each pipeline stage's files by tensor rank, to name one whose piece is refused."""
        self.renamed = renamed
        """Whether the files use Transformer Engine's names."""
        dtype = next(iter(chunks[(0, 0)][0].values())).dtype
        super().__init__(model, {k: torch.empty(s, dtype=dtype, device="meta") for k, s in logical_shapes(model).items()})
        self.where = {unit: (p, vp, local) for p in range(layout.pp) for vp in range(layout.vpp)
                      for unit, local in chunk_units(model, layout, p, vp)}

    def _read_unit(self, unit: int) -> dict[str, torch.Tensor]:
        p, vp, local = self.where[unit]
        shards, read = self.chunks[(p, vp)], []

        def pieces(stored, key: str) -> list[torch.Tensor]:
            holders = stored.holders(self.layout.tp)
            got = [shards[r][key] for r in holders]
            read.extend(got)
            try:  # here, where the key and files are known (joining checks again, without them)
                check_pieces(got, stored.split == "replicated")
            except PieceError as exc:  # a replica that differs from tensor rank 0's: name both files
                files = self.paths.get(p) or [f"tensor rank {t}" for t in range(self.layout.tp)]
                raise CheckpointError(exc.describe(lambda i: str(files[holders[i]]), key)) from None
            return got

        source = Unit(self.model, unit, mcore_table(self.model), self.layout.tp, pieces, local)
        out = dict((key, piece) for key, _, piece in source.convert(logical_table(self.model), 1, 0))
        mapped = {t.untyped_storage().data_ptr() for t in read}
        out = {k: v.clone() if v.untyped_storage().data_ptr() in mapped else v for k, v in out.items()}
        for t in read:  # nothing returned is a view of the mapped files any more
            drop_pages(t)
        return out


# -- the format's verbs (``adapter.checkpoint.formats``) -------------------------------------------------------
def detect(names: set[str]) -> bool:
    return "latest_checkpointed_iteration.txt" in names or any(n.startswith("iter_") for n in names)


def open_folder(path: Path, model: Optional[ModelConfig]) -> tuple[ModelConfig, ParallelLayout, LegacyTensors, str]:
    if model is None:
        raise CheckpointError(f"{path}: Megatron checkpoints do not record InternLM's sizes; pass --config")
    layout, tensors = read_mcore_legacy(path, model)
    return model, layout, tensors, "mcore-legacy" + (" (Transformer Engine names)" if tensors.renamed else "")


def planned_files(layout: ParallelLayout, iteration: int = 0) -> list[str]:
    return [f"iter_{iteration:07d}/{rank_dir(t, p, layout.pp)}/model_optim_rng.pt"
            for p in range(layout.pp) for t in range(layout.tp)] + ["latest_checkpointed_iteration.txt"]


def file_groups(model: ModelConfig, layout: ParallelLayout, meta: Mapping[str, torch.Tensor],
                shard_bytes: int, iteration: int = 0) -> list[FileGroup]:
    """One group per pipeline stage: its tensor ranks' ``model_optim_rng.pt``, each ``{"model": chunk}`` (or
    ``model0``, ``model1``… with virtual stages), ``iteration`` and ``checkpoint_version``."""
    def structure(entries: list[tuple[Any, torch.Tensor]]) -> dict:
        state: dict[str, Any] = {"iteration": iteration, "checkpoint_version": 3.0}
        for (chunk, key), t in entries:
            state.setdefault(chunk, {})[key] = t
        return state

    groups = []
    for p in range(layout.pp):
        where = {unit: (vp, local) for vp in range(layout.vpp) for unit, local in chunk_units(model, layout, p, vp)}

        def entries(unit: Unit, where: dict = where) -> Iterator[tuple[int, Any, torch.Tensor]]:
            vp, local = where[unit.unit]
            chunk = "model" if layout.vpp == 1 else f"model{vp}"
            for t in range(layout.tp):
                for key, _, piece in unit.convert(mcore_table(model), layout.tp, t, local):
                    yield t, (chunk, key), piece

        names = [f"iter_{iteration:07d}/{rank_dir(t, p, layout.pp)}/model_optim_rng.pt" for t in range(layout.tp)]
        groups.append(FileGroup(names, sorted(where), entries, structure))
    return groups


def finish(folder: Path, model: ModelConfig, groups: list[FileGroup], meta: Mapping[str, torch.Tensor]) -> None:
    (folder / "latest_checkpointed_iteration.txt").write_text("0\n")
