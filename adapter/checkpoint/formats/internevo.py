"""InternEvo's sharded model folders (``model_tp{t}_pp{p}.pt``, at any layout): read, write, detect.

What one file holds (InternEvo 0.5.2, modes mtp/msp/fsp; ``INTERNEVO_FORMAT.md`` §3-4, §9):

* the layers of pipeline stage ``p``, numbered from 0 *per chunk*; with ``num_chunks > 1`` every key of
  chunk ``k`` is prefixed ``"{k}.model."``; the embedding sits in the chunk that starts at layer 0 and the
  final norm and head in the chunk that ends at the last layer;
* tensor rank ``t``'s piece of each tensor, as the family's InternEvo table splits it
  (``adapter.families``): column-parallel weights on rows, row-parallel weights on columns, the embedding
  on *hidden* columns, the head on vocabulary rows with the first ranks one row larger when ``V % tp != 0``,
  norms whole in every file, a row-parallel bias only in the ``t = 0`` file, a fused qkv per rank.

A folder is read at whatever layout it was saved with. The layout is found from the files themselves:
``model_tp{t}_pp{p}.pt`` names give the tensor and pipeline sizes, ``"{k}.model."`` key prefixes the virtual
chunks, and the local layer numbers of each file how many layers every (stage, chunk) holds, so uneven splits
need no metadata. The family comes from the key names (``adapter.families``: each family's marker); the sizes
that weights cannot tell (heads) come from the folder's ``model_config.pt`` (read through an allow-list) or
from a config file.

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

import functools
import re
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Container, Iterator, Mapping, Optional

import torch

from adapter.checkpoint.errors import CheckpointError
from adapter.checkpoint.io.memory import drop_pages, empty_huge
from adapter.checkpoint.io.safe_load import load_metadata, load_tensors_like, open_model_file
from adapter.checkpoint.stream_convert import FileGroup
from adapter.config.schema import ModelConfig
from adapter.families import FAMILIES, logical_table, recognise_internevo
from adapter.model.mapping import chunk_units
from adapter.runtime.layout import ParallelLayout
from adapter.weights.stored import PieceError, Stored, check_pieces, concat
from adapter.weights.table import Unit, whole_shape, whole_unit

NAME = "internevo"
HELP = "InternEvo model_tp*_pp*.pt at any --tp/--pp/--vpp"
NEEDS_LAYOUT = True


def file_name(tp_rank: int, pp_rank: int) -> str:
    return f"model_tp{tp_rank}_pp{pp_rank}.pt"


def chunk_prefix(layout: ParallelLayout, chunk: int) -> str:
    """The key prefix of virtual chunk ``chunk`` in a file (none without virtual pipeline stages)."""
    return f"{chunk}.model." if layout.vpp > 1 else ""


def stage_units(model: ModelConfig, layout: ParallelLayout, pp_rank: int) -> Iterator[tuple[int, int, str]]:
    """``(unit, local layer number, key prefix)`` of every unit stage ``pp_rank``'s files hold, in file order."""
    for chunk in range(layout.vpp):
        for unit, local in chunk_units(model, layout, pp_rank, chunk):
            yield unit, local, chunk_prefix(layout, chunk)


#: An MLP's weights in InternEvo's files (InternLM1 ``mlp``, the others ``feed_forward``): prefix, name
MLP_KEY = re.compile(r"^(.*\b(?:feed_forward|mlp)\.)(w1|w2|w3)\.weight$")


def unit_pieces(source: Unit, model: ModelConfig, layout: ParallelLayout, local: int, prefix: str,
                tp_rank: int) -> Iterator[tuple[str, torch.Tensor]]:
    """One unit's entries in tensor rank ``tp_rank``'s file, in file order (plain slices stay views). The
    table lists an MLP as ``w1``, ``w2``, ``w3``; with ``mlp_layer_fusion`` InternEvo's save hook writes
    ``w2``, ``w1``, ``w3`` (it pops the fused parameter and appends its halves: ``model/modules/mlp.py:34-40``),
    and so does this."""
    held = None
    for key, _, piece in source.convert(logical_table(model), layout.tp, tp_rank, local):
        m = MLP_KEY.match(key) if model.mlp_layer_fusion else None
        if m is not None and m[2] == "w1":
            held = (prefix + key, piece)  # after w2
            continue
        if m is not None and m[2] == "w3" and held is not None:
            yield held
            held = None
        yield prefix + key, piece
    if held is not None:
        yield held


def shard_state_dict(logical: Mapping[str, torch.Tensor], model: ModelConfig, layout: ParallelLayout,
                     tp_rank: int, pp_rank: int) -> "OrderedDict[str, torch.Tensor]":
    """The content of ``model_tp{tp_rank}_pp{pp_rank}.pt`` for the logical weights (each tensor the whole of
    its own storage, so ``torch.save`` stores just it: a piece that is a view, or whose storage another piece
    shares, is copied; one that already is its whole storage, such as a fresh logical tensor, is not)."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    storages: set[int] = set()
    for unit, local, prefix in stage_units(model, layout, pp_rank):
        source = whole_unit(model, unit, logical_table(model), logical.__getitem__)
        pieces = unit_pieces(source, model, layout, local, prefix, tp_rank)
        out.update((k, own_storage(v, storages)) for k, v in pieces)
    return out


def own_storage(t: torch.Tensor, seen: set[int]) -> torch.Tensor:
    """``t`` if it is the whole of a storage not in ``seen`` (data pointers), else a copy; records it."""
    storage = t.untyped_storage()
    whole = (t.is_contiguous() and t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
             and storage.data_ptr() not in seen)
    out = t if whole else t.clone()
    seen.add(out.untyped_storage().data_ptr())
    return out


def stage_sources(model: ModelConfig, layout: ParallelLayout, pp_rank: int) -> dict[str, tuple[str, Stored]]:
    """Logical key → (key inside stage ``pp_rank``'s files, its row in the family's table)."""
    table = logical_table(model)
    out = {}
    for unit, local, prefix in stage_units(model, layout, pp_rank):
        for (key, stored), (file_key, _) in zip(table.keys(model, unit), table.keys(model, unit, local)):
            out[key] = (prefix + file_key, stored)
    return out


def model_config_dict(model: ModelConfig) -> dict:
    """``model_config.pt`` content: the model section in InternEvo's own keys, as a plain dict."""
    out = {
        "num_layers": model.num_layers, "hidden_size": model.hidden_size,
        "num_attention_heads": model.num_attention_heads, "vocab_size": model.vocab_size,
        "mlp_ratio": model.mlp_ratio, "multiple_of": model.multiple_of, "norm_type": model.norm_type,
        "layer_norm_epsilon": model.layer_norm_epsilon, "checkpoint": model.checkpoint,
        "num_chunks": model.num_chunks, "use_flash_attn": model.use_flash_attn, "rope_base": model.rope_base,
        "qk_interleaved": model.qk_interleaved, "embed_grad_scale": model.embed_grad_scale,
        "parallel_output": model.parallel_output, "embed_split_hidden": True, "apply_post_layer_norm": False,
        "max_position_embeddings": model.max_position_embeddings, "mlp_layer_fusion": model.mlp_layer_fusion,
        "dtype": {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}[model.dtype],
    }
    if FAMILIES[model.family].gqa:
        out.update(num_kv_attention_heads=model.num_kv_attention_heads, no_bias=model.no_bias)
    return out


MODEL_FILE = re.compile(r"^model_tp(\d+)_pp(\d+)\.pt$")
ISP_FILE = re.compile(r"^model_tp(\d+)_wp(\d+)_pp(\d+)\.pt$")
_CHUNK = re.compile(r"^(\d+)\.model\.")


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
    model_source: str = "the config"
    """Where the model sizes came from: the folder's ``model_config.pt`` or ``--config``."""
    wp: int = 1
    """Weight-parallel size of an ISP folder (``model_tp{t}_wp{w}_pp{p}.pt``), 1 otherwise."""
    legacy: bool = False
    dtype: torch.dtype | None = None
    opened: dict[tuple[int, int, int], dict] = field(default_factory=dict, repr=False)
    """Each file's memory-mapped content, opened once (reading the layout, the split check and the tensors
    all look at the same files)."""
    like: Optional["InternEvoCheckpoint"] = field(default=None, repr=False)
    """For a ``sibling``: the folder it was found beside, whose files its own files repeat the structure of."""

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

    @functools.cached_property
    def isp(self) -> bool:  # asked for every tensor read
        return any("_wp" in path.name for path in self.files.values())

    def load_file(self, tp_rank: int, pp_rank: int, wp_rank: int = 0) -> dict[str, torch.Tensor]:
        rank = (tp_rank, pp_rank, wp_rank)
        if rank not in self.opened:
            path, like = self.files[rank], self.like
            sd = None
            if like is not None and rank in like.opened:  # written alongside: its structure, not unpickled again
                sd = load_tensors_like(path, like.files[rank], like.opened[rank])
            if sd is None:
                sd = open_model_file(path)
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise CheckpointError(f"{path}: expected a dict of tensors")
            self.opened[rank] = sd
        sd = self.opened[rank]
        return _modernise(sd) if self.legacy else sd

    def sibling(self, path: Path) -> "InternEvoCheckpoint":
        """This layout in another folder written alongside this one (the optimizer states of a training
        checkpoint: one writer, one layout), its files listed but not opened; ``LazyTensors.validate`` of it
        finds files of another layout (``train.open_shared`` deals those checks out to the ranks)."""
        files = {rank: path / f.name for rank, f in self.files.items()}
        missing = next((f for f in files.values() if not f.is_file()), None)
        if missing is not None:
            raise CheckpointError(f"{missing}: missing (its folder should hold the files of {self.path})")
        return replace(self, path=path, files=files, opened={}, like=self)

    def lazy(self) -> "LazyTensors":
        """The logical tensors as a mapping that reads each one from the files only when asked."""
        if self.model is None:
            raise CheckpointError(f"{self.path}: model sizes unknown; no model_config.pt here, pass --config")
        return LazyTensors(self)


class LazyTensors(Mapping[str, torch.Tensor]):
    """Logical tensors computed on access from memory-mapped files; nothing is kept.

    Each file is mapped once (``torch.load(mmap=True)`` reads only its pickled structure); an access joins
    the tensor-rank pieces into a new tensor (on huge pages) and then drops the pages it read from this
    process's memory (they stay in the page cache), so a conversion's resident memory is what it holds, not
    what it has read."""

    def __init__(self, ckpt: InternEvoCheckpoint):
        self.ckpt = ckpt
        layout = ckpt.layout()
        self.index = {key: (p, file_key, stored) for p in range(ckpt.pp)
                      for key, (file_key, stored) in stage_sources(ckpt.model, layout, p).items()}
        self._files: dict[tuple[int, int, int], dict[str, torch.Tensor]] = {}
        #: pipeline stages whose replicas have been compared (``validate``, here or, through
        #: ``train.open_shared``, on another rank): a read of such a replicated tensor opens one file
        self.replicas_compared: set[int] = set()

    def _isp_rows(self, stored: Stored) -> bool:
        """In an ISP folder, is this a linear weight or bias (row-split over weight-parallel ranks, a fused
        qkv not regrouped)? Norms stay whole; the embedding and head go by tensor rank."""
        return self.ckpt.isp and stored.split != "replicated" and stored.atoms[0] not in ("embedding", "head")

    def _where(self, p: int, stored: Stored) -> list[tuple[int, int, int]]:
        """The files that hold pieces of a tensor of stage ``p``: ``(t=0, w)`` in ISP folders, else the tensor
        ranks that hold one."""
        if self._isp_rows(stored):
            return [(0, p, w) for w in range(self.ckpt.wp)]
        return [(t, p, 0) for t in stored.holders(self.ckpt.tp)]

    def _pieces(self, p: int, file_key: str, stored: Stored, first: bool = False) -> list[torch.Tensor]:
        """The pieces of one tensor, in the order of ``_where`` (``first``: only the first)."""
        pieces = []
        for rank in self._where(p, stored)[:1 if first else None]:
            if rank not in self._files:
                self._files[rank] = self.ckpt.load_file(*rank)
            tensors = self._files[rank]
            if file_key not in tensors:
                raise CheckpointError(f"{self.ckpt.files[rank]}: missing tensor {file_key}")
            pieces.append(tensors[file_key])
        return pieces

    def _join(self, p: int, file_key: str, stored: Stored, pieces: list[torch.Tensor],
              out: torch.Tensor | None = None) -> torch.Tensor:
        try:
            if self._isp_rows(stored):
                check_pieces(pieces, replicated=False)
                return concat(pieces, 0, out=out)
            return stored.join(pieces, out=out)
        except PieceError as exc:  # a replica that differs, a dtype that differs or is not a float: name the file
            files, bad = [self.ckpt.files[rank] for rank in self._where(p, stored)], exc.index
            raise CheckpointError(exc.describe(lambda i: str(files[i]) if i == bad else files[i].name,
                                               file_key)) from None

    def sliced_unit(self, unit: int) -> Optional[Unit]:
        """Unit ``unit`` (layers numbered globally) read piece by piece: a reader that needs a few rows of a
        tensor (a tensor rank's slice) maps only the files and pages that hold them (``Unit._sliced``).
        None for ISP folders, whose pieces are not tensor ranks' (read those through the logical tensors)."""
        if self.ckpt.isp:
            return None

        checked: set[str] = set()

        def pieces(stored: Stored, key: str) -> list[torch.Tensor]:
            p, file_key, own = self.index[key]
            if own.split == "replicated" and p in self.replicas_compared:  # checked equal: one file is opened
                return self._pieces(p, file_key, own, first=True) * len(self._where(p, own))
            pieces = self._pieces(p, file_key, own)
            if key not in checked:
                self.meta(key)  # every piece's dtype and shape checked, files named
                if own.split == "replicated":  # replicas compared byte for byte, files named
                    self._join(p, file_key, own, pieces)
                checked.add(key)
            return pieces

        def rank_piece(stored: Stored, key: str, rank: int) -> torch.Tensor:
            return pieces(stored, key)[rank]

        model = self.ckpt.model
        return Unit(model, unit, logical_table(model), self.ckpt.tp, pieces, rank_piece=rank_piece)

    def meta(self, key: str) -> torch.Tensor:
        """A ``meta`` tensor with ``key``'s logical shape and dtype (no data is read)."""
        p, file_key, stored = self.index[key]
        return self._join(p, file_key, stored, [t.to("meta") for t in self._pieces(p, file_key, stored)])

    def __getitem__(self, key: str) -> torch.Tensor:
        p, file_key, stored = self.index[key]
        pieces = self._pieces(p, file_key, stored)
        try:
            out = self._join(p, file_key, stored, pieces, out=empty_huge(self.meta(key).shape, pieces[0].dtype))
        except CheckpointError:
            raise
        except (RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{self.ckpt.path}: the pieces of {file_key} (stage {p}) do not fit together: "
                                  f"{exc}") from None
        for piece in pieces:
            drop_pages(piece)
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def validate(self, stages: Optional[Container[int]] = None) -> None:
        """Check that every tensor's pieces exist and fit, are floating point of one dtype, its replicas are
        equal (their bytes: the only data read; replicated tensors are norms), it has the shape the model
        sizes give, and no file holds a tensor this model and layout have no place for. With ``stages``,
        only those pipeline stages' tensors and files."""
        expected: dict[tuple[int, int, int], set[str]] = {}
        for key, (p, file_key, stored) in self.index.items():
            if stages is not None and p not in stages:
                continue
            pieces = self._pieces(p, file_key, stored)
            for rank in self._where(p, stored):
                expected.setdefault(rank, set()).add(file_key)
            if stored.split not in ("replicated", "first") or self._isp_rows(stored):
                dim = 1 if stored.split == "columns" and not self._isp_rows(stored) else 0
                shapes = {tuple(s for d, s in enumerate(t.shape) if d != dim) for t in pieces}
                if len(shapes) != 1:
                    raise CheckpointError(f"{self.ckpt.path}: the pieces of {file_key} (stage {p}) do not fit "
                                          f"together: shapes {[tuple(t.shape) for t in pieces]}")
            shape, want = tuple(self.meta(key).shape), whole_shape(self.ckpt.model, stored)
            if shape != want:
                raise CheckpointError(f"{self.ckpt.path}: {file_key} (stage {p}) is {shape} in the files but "
                                      f"{want} for the model {self.ckpt.model_source} describes")
            if stored.split == "replicated" and not self._isp_rows(stored):
                self._join(p, file_key, stored, pieces)  # every replica the same bytes, files named
        for rank, path in sorted(self.ckpt.files.items()):
            if stages is not None and rank[1] not in stages:
                continue
            place = expected.get(rank, set())
            if self.ckpt.isp:  # which ISP file holds what is inferred, not seen: any of the stage's keys
                place = {k for r, keys in expected.items() if r[1] == rank[1] for k in keys}
            for key in self.ckpt.load_file(*rank):
                if key not in place and not key.endswith(DERIVED):
                    raise CheckpointError(f"{path}: unexpected tensor {key}: no {self.ckpt.family} model of these "
                                          "sizes holds it in this file")
        self.replicas_compared.update(range(self.ckpt.pp) if stages is None else stages)


#: Buffers some InternEvo versions save that the weights determine (rotary frequencies from ``rope_base``).
DERIVED = ("rotary_emb.inv_freq",)


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
    stage_keys = [list(ckpt.load_file(0, p).keys()) for p in range(pp)]
    found = recognise_internevo([k for keys in stage_keys for k in keys])
    if found is None:
        markers = ", ".join(f.marker for f in FAMILIES.values())
        raise CheckpointError(f"{folder}: no layer keys of a known family ({markers}) in the model files")
    family, chunks, layers = found.name, 1, []
    for keys in stage_keys:
        per_chunk: dict[int, set[int]] = {}
        for key in keys:
            m = _CHUNK.match(key)
            chunk = int(m[1]) if m else 0
            layer = _layer_number(key[m.end():] if m else key)
            per_chunk.setdefault(chunk, set())
            if layer is not None:
                per_chunk[chunk].add(layer)
        chunks = max(chunks, max(per_chunk) + 1)
        layers.append([len(per_chunk.get(c, ())) for c in range(max(per_chunk) + 1)])
    ckpt.family, ckpt.num_chunks = family, chunks
    ckpt.layers = [row + [0] * (chunks - len(row)) for row in layers]
    first = ckpt.load_file(0, 0)
    w3 = next((v for k, v in first.items() if k.endswith("mlp.w3.weight")), None)
    w1 = next((v for k, v in first.items() if k.endswith("mlp.w1.weight")), None)
    ckpt.legacy = (family == "internlm1" and w3 is not None and w1 is not None and w3.shape != w1.shape) or any(
        k.endswith("embedding.word_embeddings.weight") for k in first)
    ckpt.dtype = next(iter(first.values())).dtype
    if model is None and (folder / "model_config.pt").exists():
        try:
            meta = load_metadata(folder / "model_config.pt")
        except Exception as exc:  # a refused or damaged pickle: unpickling errors vary
            raise CheckpointError(f"{folder / 'model_config.pt'}: cannot be read ({type(exc).__name__}: {exc}); "
                                  "pass --config to give the model sizes instead") from None
        model = normalize_model(found.model_type, meta, str(folder / "model_config.pt"))
        ckpt.model_source = "model_config.pt"
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


def _layer_number(key: str) -> int | None:
    """The layer number of a key inside one chunk (``blocks.3.…``, ``layers.3.…``: the second component),
    None outside the layers."""
    number = key.split(".")[1] if key.count(".") > 1 else ""
    return int(number) if number.isdigit() else None


# -- the format's verbs (``adapter.checkpoint.formats``) -------------------------------------------------------
def detect(names: set[str]) -> bool:
    return any(MODEL_FILE.match(n) or ISP_FILE.match(n) for n in names)


def open_folder(path: Path, model: Optional[ModelConfig]) -> tuple[ModelConfig, ParallelLayout, "LazyTensors", str]:
    """Model sizes, saved layout, lazily read logical tensors and the key-naming generation of a folder."""
    ckpt = read_internevo(path, model)
    if ckpt.model is None:
        raise CheckpointError(f"{path}: no model_config.pt, so head counts are unknown; pass --config")
    tensors = ckpt.lazy()
    tensors.validate()
    return ckpt.model, ckpt.layout(), tensors, "internevo-2023 (w2/w3 swapped)" if ckpt.legacy else "internevo"


def planned_files(layout: ParallelLayout) -> list[str]:
    return [file_name(t, p) for p in range(layout.pp) for t in range(layout.tp)] + ["model_config.pt"]


def file_groups(model: ModelConfig, layout: ParallelLayout, meta: Mapping[str, torch.Tensor],
                shard_bytes: int) -> list[FileGroup]:
    """One group per pipeline stage: its tensor ranks' files."""
    groups = []
    for p in range(layout.pp):
        where = {unit: (local, prefix) for unit, local, prefix in stage_units(model, layout, p)}

        def entries(unit: Unit, where: dict = where) -> Iterator[tuple[int, str, torch.Tensor]]:
            local, prefix = where[unit.unit]
            for t in range(layout.tp):
                for key, piece in unit_pieces(unit, model, layout, local, prefix, t):
                    yield t, key, piece

        groups.append(FileGroup([file_name(t, p) for t in range(layout.tp)], list(where), entries, OrderedDict))
    return groups


def finish(folder: Path, model: ModelConfig, groups: list[FileGroup], meta: Mapping[str, torch.Tensor]) -> None:
    torch.save(model_config_dict(model), folder / "model_config.pt")
