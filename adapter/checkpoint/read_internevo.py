"""Read an InternEvo checkpoint folder at whatever layout it was saved with.

The layout is found from the files themselves: ``model_tp{t}_pp{p}.pt`` names give the tensor and pipeline
sizes, ``"{k}.model."`` key prefixes the virtual chunks, and the local layer numbers of each file how many
layers every (stage, chunk) holds, so uneven splits need no metadata. The family comes from the key names
(``blocks.*`` InternLM1, ``layers.*`` InternLM2); the sizes that weights cannot tell (heads) come from the
folder's ``model_config.pt`` (read through an allow-list) or from a config file.

ISP folders (``model_tp{t}_wp{w}_pp{p}.pt``, InternEvo's ``tensor.mode="isp"``) are read too: every linear
weight and bias is a row slice of the logical tensor over the weight-parallel ranks (the fused qkv is *not*
regrouped per rank there), while the embedding (hidden columns) and the head (vocabulary rows) are split over
the tensor ranks, as in the other modes. This layout is inferred from InternEvo 0.5.2's source; no
InternEvo-written ISP checkpoint was available to check it against.

Older InternLM1 checkpoints (InternLM 2023) are recognised by shape and renamed on the fly: their MLP had
``w2`` = up and ``w3`` = down (a ``w3`` of shape ``[H, F]``), and with ``embed_split_hidden=False`` a
vocabulary-parallel ``embedding.word_embeddings.weight``.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from adapter.checkpoint.internevo import merge, stage_sources
from adapter.checkpoint.memory import drop_pages, empty_huge
from adapter.checkpoint.safe_load import load_metadata, load_tensors
from adapter.config.schema import ModelConfig
from adapter.model.mapping import LOGICAL_NAMES
from adapter.runtime.layout import ParallelLayout

MODEL_FILE = re.compile(r"^model_tp(\d+)_pp(\d+)\.pt$")
ISP_FILE = re.compile(r"^model_tp(\d+)_wp(\d+)_pp(\d+)\.pt$")
_CHUNK = re.compile(r"^(\d+)\.model\.")
_LAYER = re.compile(r"^(?:blocks|layers)\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint is incomplete, corrupt or inconsistent; the message names the file and tensor."""


def open_model_file(path: Path, megatron: bool = False) -> Any:
    """A model file, memory-mapped and read with ``weights_only=True``; any failure names the file.
    ``megatron``: Megatron-LM's ``model_optim_rng.pt``, with its few kinds of non-tensor object allowed."""
    try:
        return load_tensors(path, megatron=megatron)
    except Exception as exc:
        refused = re.search(r"GLOBAL (\S+)", str(exc)) if isinstance(exc, pickle.UnpicklingError) else None
        if refused:  # torch's message goes on to suggest weights_only=False, which is not advice to pass on
            raise CheckpointError(f"{path}: cannot be read: it asks to load {refused[1]}, which is neither a "
                                  "tensor nor on the allow-list (refused, not run)") from exc
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({type(exc).__name__}: {exc})") from exc


@dataclass
class InternEvoCheckpoint:
    path: Path
    family: str
    tp: int
    pp: int
    num_chunks: int
    layers: list[list[int]]
    """``layers[pp_rank][chunk]``: how many layers that chunk holds."""
    files: dict[tuple[int, int, int], Path]
    """``files[(tp_rank, pp_rank, wp_rank)]``; ``wp_rank`` is 0 except in ISP folders."""
    model: ModelConfig | None = None
    wp: int = 1
    """Weight-parallel size of an ISP folder (``model_tp{t}_wp{w}_pp{p}.pt``), 1 otherwise."""
    legacy: bool = False
    dtype: torch.dtype | None = None

    @property
    def num_layers(self) -> int:
        return sum(sum(row) for row in self.layers)

    def layout(self) -> ParallelLayout:
        """The saved layout; chunks are numbered chunk-major like InternEvo's partition."""
        stages: list[list[tuple[int, int]]] = [[] for _ in range(self.pp)]
        start = 0
        for chunk in range(self.num_chunks):
            for p in range(self.pp):
                n = self.layers[p][chunk]
                stages[p].append((start, start + n))
                start += n
        return ParallelLayout(tp=self.tp, pp=self.pp, vpp=self.num_chunks, dp=None, zero1=None,
                              sequence_parallel=False, stages=tuple(tuple(s) for s in stages))

    @property
    def isp(self) -> bool:
        return any("_wp" in path.name for path in self.files.values())

    def load_file(self, tp_rank: int, pp_rank: int, wp_rank: int = 0) -> dict[str, torch.Tensor]:
        path = self.files[(tp_rank, pp_rank, wp_rank)]
        sd = open_model_file(path)
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{path}: expected a dict of tensors")
        return _modernise(sd) if self.legacy else sd

    def logical(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.lazy().items()

    def lazy(self) -> "LazyTensors":
        """The logical tensors as a mapping that reads each one from the files only when asked."""
        if self.model is None:
            raise CheckpointError(f"{self.path}: model sizes unknown; no model_config.pt here, pass --config")
        return LazyTensors(self)


class LazyTensors(Mapping[str, torch.Tensor]):
    """Logical tensors computed on access from memory-mapped files; nothing is kept.

    Each file is mapped once (``torch.load(mmap=True)`` reads only its pickled structure); an access merges
    the tensor-rank pieces into a new tensor (on huge pages) and then drops the pages it read from this
    process's memory (they stay in the page cache), so a conversion's resident memory is what it holds, not
    what it has read."""

    def __init__(self, ckpt: InternEvoCheckpoint):
        self.ckpt = ckpt
        layout = ckpt.layout()
        self.index = {key: (p, file_key, kind) for p in range(ckpt.pp)
                      for key, (file_key, kind) in stage_sources(ckpt.model, layout, p).items()}
        names = LOGICAL_NAMES[ckpt.model.family]
        self.tensor_split = {names["embedding"], names["head"]}  # split over tensor ranks even in ISP
        self._files: dict[tuple[int, int, int], dict[str, torch.Tensor]] = {}

    def _isp_rows(self, key: str) -> bool:
        """In an ISP folder, is ``key`` a linear weight or bias (row-split over weight-parallel ranks)?
        Norms (the only keys with "norm" in their names) stay whole; embedding and head go by tensor rank."""
        return self.ckpt.isp and "norm" not in key and key not in self.tensor_split

    def _pieces(self, key: str, p: int, file_key: str, kind: str) -> list[torch.Tensor]:
        """The per-rank pieces of one tensor. In ISP folders every linear weight and bias is cut on rows
        over the weight-parallel ranks (``(t=0, w)`` files); embedding and head over the tensor ranks."""
        if self._isp_rows(key):
            where = [(0, p, w) for w in range(self.ckpt.wp)]
        else:
            where = [(t, p, 0) for t in ([0] if kind == "first" else range(self.ckpt.tp))]
        pieces = []
        for rank in where:
            if rank not in self._files:
                self._files[rank] = self.ckpt.load_file(*rank)
            tensors = self._files[rank]
            if file_key not in tensors:
                raise CheckpointError(f"{self.ckpt.files[rank]}: missing tensor {file_key}")
            pieces.append(tensors[file_key])
        return pieces

    def meta(self, key: str) -> torch.Tensor:
        """A ``meta`` tensor with ``key``'s logical shape and dtype (no data is read)."""
        p, file_key, kind = self.index[key]
        pieces = [t.to("meta") for t in self._pieces(key, p, file_key, kind)]
        return merge(self.ckpt.model, "rows" if self._isp_rows(key) else kind, pieces)

    def __getitem__(self, key: str) -> torch.Tensor:
        p, file_key, kind = self.index[key]
        pieces = self._pieces(key, p, file_key, kind)
        if self._isp_rows(key):
            kind = "rows"  # ISP: plain row slices of the logical tensor, qkv and biases included
        try:
            out = merge(self.ckpt.model, kind, pieces, out=empty_huge(self.meta(key).shape, pieces[0].dtype))
        except RuntimeError as exc:
            raise CheckpointError(f"{self.ckpt.path}: the pieces of {file_key} (stage {p}) do not fit together: "
                                  f"{exc}") from None
        for piece in pieces:
            drop_pages(piece)
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def validate(self) -> None:
        """Check every tensor's pieces exist and fit, from shapes only (no tensor data is read)."""
        for key, (p, file_key, kind) in self.index.items():
            pieces = self._pieces(key, p, file_key, kind)
            if self._isp_rows(key):
                kind = "rows"
            if kind in ("hidden", "columns", "rows"):
                dim = 0 if kind == "rows" else 1
                shapes = {tuple(s for d, s in enumerate(t.shape) if d != dim) for t in pieces}
                if len(shapes) != 1:
                    raise CheckpointError(f"{self.ckpt.path}: the pieces of {file_key} (stage {p}) do not fit "
                                          f"together: shapes {[tuple(t.shape) for t in pieces]}")

def _modernise(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The 2023 InternLM1 naming (``w2``/``w3`` swapped, ``embedding.word_embeddings``) as today's."""
    out = {}
    for key, value in sd.items():
        if key.endswith("mlp.w2.weight"):
            key = key.replace("mlp.w2.", "mlp.w3.")  # legacy up
        elif key.endswith("mlp.w3.weight"):
            key = key.replace("mlp.w3.", "mlp.w2.")  # legacy down
        elif key.endswith("embedding.word_embeddings.weight"):
            key = key.replace("embedding.word_embeddings.weight", "embedding.weight")
        elif key.endswith("rotary_emb.inv_freq"):
            continue
        out[key] = value
    return out


def read_internevo(path: str | Path, model: ModelConfig | None = None) -> InternEvoCheckpoint:
    """Inspect an InternEvo folder: layout, family and (from ``model_config.pt`` unless given) model sizes."""
    from adapter.config.normalize import normalize_model

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    names = sorted(p.name for p in folder.iterdir())
    files = {(int(m[1]), int(m[2]), 0): folder / n for n in names if (m := MODEL_FILE.match(n))}
    isp = {(int(m[1]), int(m[3]), int(m[2])): folder / n for n in names if (m := ISP_FILE.match(n))}
    if files and isp:
        raise CheckpointError(f"{folder}: holds both model_tp*_pp*.pt and ISP model_tp*_wp*_pp*.pt files")
    files = files or isp
    if not files:
        raise CheckpointError(f"{folder}: no model_tp*_pp*.pt (or ISP model_tp*_wp*_pp*.pt) files")
    tp, pp, wp = (max(k[i] for k in files) + 1 for i in range(3))
    for t in range(tp):
        for p in range(pp):
            for w in range(wp):
                if (t, p, w) not in files:
                    name = f"model_tp{t}_wp{w}_pp{p}.pt" if isp else f"model_tp{t}_pp{p}.pt"
                    raise CheckpointError(f"{folder}: {name} is missing (found tp={tp}, pp={pp}"
                                          + (f", wp={wp})" if isp else ")"))
    ckpt = InternEvoCheckpoint(folder, "", tp, pp, 1, [], files, wp=wp)
    layers, family, chunks = [], None, 1
    for p in range(pp):
        keys = list(ckpt.load_file(0, p).keys())
        per_chunk: dict[int, set[int]] = {}
        for key in keys:
            m = _CHUNK.match(key)
            chunk = int(m[1]) if m else 0
            rest = key[m.end():] if m else key
            if rest.startswith("blocks."):
                family = family or "internlm1"
            elif rest.startswith("layers."):
                family = family or "internlm2"
            layer = _LAYER.match(rest)
            per_chunk.setdefault(chunk, set())
            if layer:
                per_chunk[chunk].add(int(layer[1]))
        chunks = max(chunks, max(per_chunk) + 1)
        layers.append([len(per_chunk.get(c, ())) for c in range(max(per_chunk) + 1)])
    if family is None:
        raise CheckpointError(f"{folder}: no InternLM layer keys (blocks.* or layers.*) in the model files")
    ckpt.family, ckpt.num_chunks = family, chunks
    ckpt.layers = [row + [0] * (chunks - len(row)) for row in layers]
    first = ckpt.load_file(0, 0)
    w3 = next((v for k, v in first.items() if k.endswith("mlp.w3.weight")), None)
    w1 = next((v for k, v in first.items() if k.endswith("mlp.w1.weight")), None)
    ckpt.legacy = (family == "internlm1" and w3 is not None and w1 is not None and w3.shape != w1.shape) or any(
        k.endswith("embedding.word_embeddings.weight") for k in first)
    ckpt.dtype = next(iter(first.values())).dtype
    if model is None and (folder / "model_config.pt").exists():
        meta = load_metadata(folder / "model_config.pt")
        model = normalize_model("INTERNLM" if family == "internlm1" else "INTERNLM2_PUBLIC", meta,
                                str(folder / "model_config.pt"))
    if model is not None:
        if model.family != family:
            raise CheckpointError(f"{folder}: files hold {family} but the config describes {model.family}")
        if model.num_layers != ckpt.num_layers:
            raise CheckpointError(f"{folder}: files hold {ckpt.num_layers} layers, the config {model.num_layers}")
    ckpt.model = model
    if model is not None:
        _check_split(ckpt)
    return ckpt


def _check_split(ckpt: InternEvoCheckpoint) -> None:
    """The layout is read from file names, so a deleted last shard (``model_tp1_pp0.pt`` of a tp=2 folder)
    would pass for a smaller layout holding part of every tensor; the MLP width says how many shards there
    were. (In ISP folders the MLP is split over the weight-parallel ranks.)"""
    ways = ckpt.wp if ckpt.isp else ckpt.tp
    for p in range(ckpt.pp):
        w1 = next((v for k, v in ckpt.load_file(0, p).items() if k.endswith("w1.weight")), None)
        if w1 is None:
            continue
        width = ckpt.model.ffn_hidden_size
        if w1.shape[0] * ways != width:
            saved = width // w1.shape[0] if w1.shape[0] and width % w1.shape[0] == 0 else 0
            what = "wp" if ckpt.isp else "tp"
            if saved > ways:
                raise CheckpointError(f"{ckpt.path}: each shard holds {w1.shape[0]} of the MLP width {width}, so "
                                      f"the folder was saved at {what}={saved}, but only {ways} {what} ranks are "
                                      f"here: the files of {what} ranks {ways}..{saved - 1} are missing")
            raise CheckpointError(f"{ckpt.path}: each shard holds {w1.shape[0]} of the MLP width {width}, which "
                                  f"does not fit {what}={ways}")
        return
