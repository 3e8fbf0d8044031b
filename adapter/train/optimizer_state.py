"""The optimizer state of a training checkpoint, per logical tensor, so that a run resumes at any layout.

DeepSpeed's own ZeRO-1 checkpoint holds each data-parallel rank's flat fp32 partition: it can only be read
back at the layout that wrote it. Here every parameter's fp32 master weight and Adam moments are cut into
InternEvo's pieces the way the model is (``stage_file``), each unit by the data-parallel rank whose ZeRO
partition holds most of it (``shared_files``; the rest of it comes from the other ranks, ``ZeroStates``),
and written as three InternEvo-layout model folders beside the weights (``StateSave``):

    <checkpoint>/optimizer/fp32/model_tp{t}_pp{p}.pt        fp32 master weights
    <checkpoint>/optimizer/exp_avg/model_tp{t}_pp{p}.pt     Adam's first moment
    <checkpoint>/optimizer/exp_avg_sq/model_tp{t}_pp{p}.pt  Adam's second moment
    <checkpoint>/optimizer/state.pt                        Adam's step per parameter group

so the checkpoint bridge reads them at any tensor/pipeline/virtual layout, like the weights. Loading cuts
each tensor for this rank (``chunk_pieces``) and sets ZeRO's partition from it (``_set_part``, what
DeepSpeed's ``safe_set_full_*`` do); a state of a parameter is the same whatever the data-parallel size, so
the data-parallel size may change too.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable, Container, Optional, Union

import torch
import torch.distributed as dist

from adapter.checkpoint.formats.internevo import model_config_dict
from adapter.checkpoint.io import mapped
from adapter.checkpoint.io.memory import empty_to_fill
from adapter.checkpoint.io.safe_load import load_metadata
from adapter.config.schema import InternLMConfig
from adapter.runtime.dist import all_gather_into, device
from adapter.runtime.layout import ParallelLayout
from adapter.train.shared_files import File, Rows, Together, even_shares, file_skeleton, owners, unit_params
from adapter.weights.table import Unit

FOLDER = "optimizer"
STATES = ("fp32", "exp_avg", "exp_avg_sq")
STEPS_FILE = "state.pt"


def stage_file(cfg: InternLMConfig, layout: ParallelLayout, chunks: list,
               value: Callable[[str, torch.nn.Parameter], Optional[torch.Tensor]],
               units: Optional[Container[tuple[int, int]]] = None,
               spread: bool = False) -> "dict[int, OrderedDict[str, Union[torch.Tensor, Rows]]]":
    """What this rank writes of ``value(name, parameter)`` into the ``model_tp{t}_pp{p}.pt`` files, by tensor
    rank ``t``: its own file's entries in file order, or with ``units`` (``(chunk, unit)`` pairs) just those
    units' entries. Collective over the tensor group (every tensor rank passes the same ``units`` and
    ``spread``), and over whatever group ``value`` itself talks to: ``value`` is called for every parameter,
    and may return None for those outside ``units``.

    Each tensor rank cuts its file's pieces from its own parameters wherever InternEvo's split of a tensor
    is megatron-core's (every linear layer and fused qkv/MLP: the same rows or columns of each atom on the
    same rank; replicated tensors from its own replica), so only the embedding crosses between tensor ranks
    (megatron-core splits it on the vocabulary, InternEvo on the hidden size). Each rank receives just the
    hidden columns it keeps of the others' rows (``_exchange_tensor_ranks``), or, with ``spread`` (the
    tensor ranks write each other's files), nothing: its vocabulary rows of every rank's columns go to that
    rank's file as ``Rows``. The pieces are views (of the parameters, of DeepSpeed's flat buffers) wherever
    the cut allows, and stay on their device (the writer copies each to host memory as it writes it); a
    piece the cut computes anew (a join, a regrouping) is moved to host memory at once, so that a rank
    holding every state's pieces before writing (``StateSave``) adds no accelerator memory."""
    from megatron.core import parallel_state as ps

    from adapter.checkpoint.formats.internevo import chunk_prefix, unit_pieces
    from adapter.model.mapping import chunk_units, mcore_table

    model, tp_rank, pp_rank = cfg.model, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    out: dict[int, OrderedDict[str, Union[torch.Tensor, Rows]]] = {tp_rank: OrderedDict()}
    mine: dict[str, torch.Tensor] = {}
    spreads: list[tuple[torch.Tensor, dict[int, Rows]]] = []  # (placeholder piece, its rows for every file)

    def exchange(stored, key: str, dim: int, bounds: list[int], join: int) -> torch.Tensor:
        if spread and join == 0:  # rows of the joined piece are contiguous bytes of its record
            return _spread_rows(mine[key], dim, bounds, tp_rank, spreads)
        return _exchange_tensor_ranks(key, mine[key], dim, bounds, join)

    for vp, chunk in enumerate(chunks):
        cut = [(unit, local) for unit, local in chunk_units(model, layout, pp_rank, vp)
               if units is None or (vp, unit) in units]
        mine.clear()
        for name, p in chunk.named_parameters():
            v = value(name, p)
            if v is not None:
                mine[name] = v.detach()
        sources = {v.untyped_storage().data_ptr() for v in mine.values()}
        for unit, local in cut:
            source = Unit(model, unit, mcore_table(model), layout.tp,
                          lambda stored, key: _gather_tensor_ranks(key, mine[key], layout.tp), local,
                          rank_piece=lambda stored, key, rank: mine[key], local_rank=tp_rank, exchange=exchange)
            for k, v in unit_pieces(source, model, layout, local, chunk_prefix(layout, vp), tp_rank):
                if spreads and v is spreads[0][0]:
                    for t, rows in spreads.pop(0)[1].items():
                        out.setdefault(t, OrderedDict())[k] = rows
                else:  # views as they are, new tensors in host memory (on the CPU: the same tensors)
                    out[tp_rank][k] = v if v.untyped_storage().data_ptr() in sources else v.cpu()
            if spreads:
                raise RuntimeError(f"unit {unit}: a piece left to the tensor ranks' writes was computed on")
    return out


def _spread_rows(t: torch.Tensor, dim: int, bounds: list[int], rank: int,
                 spreads: list[tuple[torch.Tensor, dict[int, Rows]]]) -> torch.Tensor:
    """Where ``_exchange_tensor_ranks`` would join every tensor rank's rows of this rank's slice, what this
    rank writes instead: for each tensor rank ``r`` of ``t``'s rank-ordered pieces (split along dimension 0),
    rows ``rank·n:(rank+1)·n`` (``n = len(t)``) of its slice ``bounds[r]:bounds[r + 1]`` along ``dim``, kept
    in ``spreads`` with a placeholder of this rank's joined piece, which is returned."""
    n, shape = t.shape[0], list(t.shape)
    shape[0], shape[dim] = n * (len(bounds) - 1), bounds[rank + 1] - bounds[rank]
    placeholder = torch.empty(shape, dtype=t.dtype, device="meta")
    spreads.append((placeholder, {r: Rows(rank * n, t.narrow(dim, bounds[r], bounds[r + 1] - bounds[r]).cpu())
                                  for r in range(len(bounds) - 1)}))
    return placeholder


def _gather_tensor_ranks(name: str, t: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Every tensor rank's ``t`` (parameter ``name``), in rank order (its shape checked the same on every rank).

    Not ``all_gather_object``: pickling a tensor writes its whole storage, and DeepSpeed keeps the parameters
    as views of one flat buffer, so each parameter would carry the whole buffer (a model of 40 parameters
    pickled 40 times its size)."""
    if tp == 1:
        return [t]
    from megatron.core import parallel_state as ps

    t = t.to(device())  # where the tensor group communicates (a value may be in host memory: ZeroStates)
    group = ps.get_tensor_model_parallel_group()
    _check_same_shape(name, t, group, tp)
    pieces = [torch.empty_like(t, memory_format=torch.contiguous_format) for _ in range(tp)]
    dist.all_gather(pieces, t.contiguous(), group=group)
    return pieces


def _exchange_tensor_ranks(name: str, t: torch.Tensor, dim: int, bounds: list[int], join: int) -> torch.Tensor:
    """This rank's slice ``bounds[r]:bounds[r + 1]`` along ``dim`` of every tensor rank's ``t`` (parameter
    ``name``, split over the ranks along ``join``), joined along ``join``: each rank sends every other one
    just the slice it keeps (``Unit``'s ``exchange``). Collective over the tensor group."""
    from megatron.core import parallel_state as ps

    t = t.to(device())  # where the tensor group communicates (a value may be in host memory: ZeroStates)
    group = ps.get_tensor_model_parallel_group()
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    ranks = dist.get_process_group_ranks(group)
    _check_same_shape(name, t, group, tp)
    n = t.shape[join]
    shape = list(t.shape)
    shape[dim], shape[join] = bounds[rank + 1] - bounds[rank], n * tp
    out = torch.empty(shape, dtype=t.dtype, device=t.device)
    ops, landed = [], []
    for j in range(tp):
        if j == rank:
            continue
        place = out.narrow(join, j * n, n)
        buffer = place if place.is_contiguous() else torch.empty_like(place, memory_format=torch.contiguous_format)
        landed.append((place, buffer))
        ops.append(dist.P2POp(dist.irecv, buffer, ranks[j], group))
        ops.append(dist.P2POp(dist.isend, t.narrow(dim, bounds[j], bounds[j + 1] - bounds[j]).contiguous(),
                              ranks[j], group))
    # one batch: each pair of ranks both sends and receives, which NCCL runs only when grouped
    requests = dist.batch_isend_irecv(ops)
    out.narrow(join, rank * n, n).copy_(t.narrow(dim, bounds[rank], bounds[rank + 1] - bounds[rank]))
    for request in requests:
        request.wait()
    for place, buffer in landed:
        if buffer is not place:
            place.copy_(buffer)
    return out


def _check_same_shape(name: str, t: torch.Tensor, group, tp: int) -> None:
    """One all-gather of ``t``'s shape over the tensor group: megatron-core splits every tensor-parallel
    parameter evenly, so a rank holding another shape is a bug to stop at, not data to join."""
    shape = torch.tensor([t.dim(), *t.shape] + [0] * (4 - t.dim()), dtype=torch.int64, device=t.device)
    shapes = [torch.empty_like(shape) for _ in range(tp)]
    dist.all_gather(shapes, shape, group=group)
    if any(not torch.equal(other, shape) for other in shapes):
        raise RuntimeError(f"{name}: tensor-parallel ranks hold it in different shapes "
                           f"{[tuple(s[1:1 + s[0]].tolist()) for s in shapes]}")


class ZeroStates:
    """Whole fp32 masters and Adam moments of parameters, each assembled from ZeRO-1's partitions at the
    data-parallel rank that writes it (its owner, ``shared_files.owners``).

    DeepSpeed links each parameter to the part of it this rank's partition holds (``_hp_mapping``: where it
    starts in the parameter, ``lp_fragment_address``, and its fp32 and optimizer-state values,
    ``get_hp_fragment``), the links its own ``safe_get_full_*`` read. Those all-reduce a zero-filled copy of
    the whole parameter over every data-parallel rank; here each rank sends its parts to the parameter's
    owner, point to point, so every element that moves crosses once and nobody else receives or sums
    anything.

    One state moves at a time: ``start`` posts its transfers without waiting (the sends read ZeRO's buffers
    in place), so they travel while the rank cuts (or writes) the previous file; ``value`` waits for a
    parameter's receives; ``finish`` waits for the rest, and must come before the next ``start`` and before
    the optimizer steps again. Every rank posts its operations in parameter order, sends and receives alike, so
    each pair of ranks posts its operations in the same order on both sides (what NCCL needs, whose
    operations between two ranks run in posting order on one stream). A parameter that its owner's
    partition holds whole is a view of it, not a copy, on the partition's device: the file writer copies
    each tensor to host memory as it writes it (``shared_write``), so a rank that cuts every state before
    writing (``StateSave``) holds no second copy of its own partition. An assembled value comes back in
    host memory (on an accelerator, a copy that frees the receive buffer), and at most ``WINDOW`` bytes of
    receive buffers are posted ahead of the parameter being read (at least one parameter's): posting stops at
    a receive that does not fit, until ``value`` has taken the ones before it. Collective over data parallel:
    every rank constructs it, and starts the same states with the same owners in the same order."""

    #: bytes of receive buffers posted ahead (on an accelerator they are device memory until read)
    WINDOW = 1 << 30

    def __init__(self, chunks: list):
        self.params = [p for chunk in chunks for _, p in chunk.named_parameters()]
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.group = self.params[0]._dp_group
        self.ranks = dist.get_process_group_ranks(self.group)
        self.rank = dist.get_rank(self.group)
        mine = [None if p._hp_mapping is None else
                (p._hp_mapping.lp_fragment_address.start, p._hp_mapping.lp_fragment_address.numel)
                for p in self.params]
        self.parts: list = [None] * len(self.ranks)
        dist.all_gather_object(self.parts, mine, group=self.group)  # where every rank's parts are: small
        for i, p in enumerate(self.params):
            held = sum(parts[i][1] for parts in self.parts if parts[i] is not None)
            if held != p.numel():
                raise RuntimeError(f"ZeRO's partitions hold {held} of a parameter's {p.numel()} elements")
        self.key: Optional[str] = None  # the state in flight, its owners and its message tag
        self.owners: list[int] = []
        self.tag = 0
        self.next = 0  # the first parameter whose operations are not posted yet
        self.receiving: dict[int, tuple[torch.Tensor, list]] = {}
        self.in_flight = 0  # bytes of the buffers in ``receiving``
        self.sends: list = []

    @staticmethod
    def available(chunks: list) -> bool:
        """Whether DeepSpeed linked every parameter to its partition (ZeRO stage 1 or 2)."""
        params = [p for chunk in chunks for p in chunk.parameters()]
        return bool(params) and all(hasattr(p, "_hp_mapping") and getattr(p, "_dp_group", None) is params[0]._dp_group
                                    for p in params)

    def held(self) -> list[list[int]]:
        """How many elements of each parameter each data-parallel rank's partition holds."""
        return [[0 if part is None else part[1] for part in parts] for parts in self.parts]

    def _part(self, p: torch.nn.Parameter) -> Optional[torch.Tensor]:
        mapping = p._hp_mapping
        return None if mapping is None else mapping.get_hp_fragment(None if self.key == "fp32" else self.key)

    def start(self, key: str, owners: list[int]) -> None:
        """Start moving every parameter's ``key`` (``fp32`` or an Adam state) to its data-parallel rank
        ``owners[i]``."""
        self.key, self.owners, self.tag, self.next = key, owners, self.tag + 1, 0  # one tag per state (gloo)
        self._post()

    def _post(self) -> None:
        """Post the next parameters' sends and receives, in parameter order, until a receive does not fit
        in ``WINDOW``."""
        while self.next < len(self.params):
            i, p = self.next, self.params[self.next]
            if self.owners[i] != self.rank:
                part = self._part(p)
                if part is not None:
                    self.sends.append(dist.isend(part.contiguous(), dst=self.ranks[self.owners[i]],
                                                 group=self.group, tag=self.tag))
            elif any(parts[i] is not None for r, parts in enumerate(self.parts) if r != self.rank):
                if self.receiving and self.in_flight + p.numel() * 4 > self.WINDOW:
                    return
                whole = torch.empty(p.numel(), dtype=torch.float32, device=p.device)
                requests = []
                for r, parts in enumerate(self.parts):
                    if parts[i] is not None and r != self.rank:
                        place = whole.narrow(0, parts[i][0], parts[i][1])
                        requests.append(dist.irecv(place, src=self.ranks[r], group=self.group, tag=self.tag))
                self.receiving[i] = (whole, requests)
                self.in_flight += p.numel() * 4
            self.next += 1

    def value(self, p: torch.nn.Parameter) -> Optional[torch.Tensor]:
        """``p``'s whole value of the state in flight at its owner (a view of the partition where it holds
        ``p`` whole, else assembled in host memory); None elsewhere."""
        i, part = self.index[id(p)], self._part(p)
        if self.owners[i] != self.rank:
            return None
        if i not in self.receiving and part is not None and part.numel() == p.numel():
            return part.view(p.shape)  # held whole here: a view, copied to host only as it is written
        whole, requests = self.receiving.pop(i)
        self.in_flight -= whole.numel() * 4
        if part is not None:
            whole.narrow(0, self.parts[self.rank][i][0], self.parts[self.rank][i][1]).copy_(part)
        for request in requests:
            request.wait()
        self._post()
        return whole.view(p.shape).cpu()

    def finish(self) -> None:
        """Wait until this rank's transfers of the current state are done (its parts may then change)."""
        if self.next != len(self.params):
            raise RuntimeError(f"{len(self.params) - self.next} parameters' transfers were never posted: "
                               "every owner must take each of its values")
        for _, requests in self.receiving.values():
            for request in requests:
                request.wait()
        for request in self.sends:
            request.wait()
        self.sends, self.receiving, self.in_flight = [], {}, 0


def has_state(trainer) -> bool:
    """Whether Adam has taken a step (before the first update there is no state to save)."""
    return bool(trainer.optimizer.optimizer.state)


def writer(index: int, dp: int) -> int:
    """The data-parallel rank that creates file ``index`` of a (tensor, pipeline) rank's four: the model (0),
    then the ``STATES`` (1-3), and writes all of it where its data-parallel ranks do not share a file system
    (``shared_files``). Spread like this, the files are created, sealed or written side by side."""
    return index % dp


class StateSave:
    """Writing a pipeline stage's files of a checkpoint (the model, then ``<checkpoint>/optimizer``) with its
    tensor and data-parallel ranks, each writing the units it owns (``shared_files``). The constructor
    decides the owners and starts moving the first state's parts to them, so they travel while the model is
    cut; each state's transfers start as soon as the previous state is cut. Collective over all ranks.

    Where the ranks share a file system (``shared``) all the stage's files are reserved at once, every state
    is cut (views of ZeRO's buffers, but the parts received), and then each rank writes its parts of the
    files in its own turn (data-parallel rank ``r`` starts with file ``r``), so that the ranks write different
    files at a time: a file system writes into one file one writer at a time (ext4 and XFS lock the file for
    a buffered write). Each tensor rank writes its own vocabulary rows of the embedding into every tensor
    rank's file (``stage_file``'s ``spread``). Otherwise each file is written by its creator as soon as it is
    cut, so that it holds one state at a time, and the embedding's columns are exchanged between tensor
    ranks first."""

    def __init__(self, trainer, cfg: InternLMConfig, layout: ParallelLayout, shared: bool):
        from megatron.core import parallel_state as ps

        from adapter.runtime.dist import stage_group_gloo

        self.trainer, self.cfg, self.layout, self.shared = trainer, cfg, layout, shared
        self.stateful = has_state(trainer)
        self.tp_rank, self.pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        self.dp_rank, self.dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        # only small objects travel on these CPU groups (megatron-core's twin of the data-parallel group)
        if shared:
            self.group = stage_group_gloo()
        else:
            try:
                self.group = ps.get_data_parallel_group_gloo()
            except AssertionError:  # made without gloo groups (create_gloo_process_groups=False)
                self.group = ps.get_data_parallel_group()
        self.zero = ZeroStates(trainer.chunks) if self.stateful and ZeroStates.available(trainer.chunks) else None
        params = [p for chunk in trainer.chunks for p in chunk.parameters()]
        held = self.zero.held() if self.zero is not None else even_shares([p.numel() for p in params], self.dp)
        units = unit_params(cfg.model, layout, self.pp_rank, trainer.chunks)
        self.owners = [owners(units, held, list(range(self.dp)) if shared else [writer(i, self.dp)])
                       for i in range(1 + len(STATES))]
        self.dtype = params[0].dtype
        if self.zero is not None:
            self.zero.start(STATES[0], self.owners[1].params)

    def write(self, folder: Path, save: Callable[[object, Path], None]) -> None:
        """The model files and, once Adam has stepped, ``<folder>/optimizer`` (its folders made; its small
        files written through ``save(obj, path)``)."""
        n = 1 + len(STATES) if self.stateful else 1
        for k in range(1, n):
            if self.dp_rank == writer(k, self.dp) and self.tp_rank == 0 and self.pp_rank == 0:
                save(model_config_dict(self.cfg.model), folder / FOLDER / STATES[k - 1] / "model_config.pt")
        if self.shared:  # every tensor rank's files, numbered tensor rank × n + file
            tensor_ranks = range(self.layout.tp)
            together = Together([self._file(folder, t, k) for t in tensor_ranks for k in range(n)], self.group)
            contents = [self._cut(k) for k in range(n)]
            for j in range(n):
                k = (self.dp_rank + j) % n
                for t, content in contents[k].items():
                    together.write(t * n + k, content)
                contents[k] = None  # written: its host copies go
            together.close()
        else:
            for k in range(n):
                together = Together([self._file(folder, self.tp_rank, k)], self.group)
                together.write(0, self._cut(k)[self.tp_rank])
                together.close()
        if self.stateful and dist.get_rank() == 0:
            adam = self.trainer.optimizer.optimizer
            steps = [int(adam.state[group["params"][0]]["step"]) for group in adam.param_groups]
            save({"steps": steps}, folder / FOLDER / STEPS_FILE)

    def _file(self, folder: Path, tp_rank: int, k: int) -> File:
        """File ``k`` of tensor rank ``tp_rank`` (0: the weights; then the ``STATES``), created by the rank of
        ``self.group`` that ``writer`` names."""
        name = f"model_tp{tp_rank}_pp{self.pp_rank}.pt"
        creator = writer(k, self.dp) * self.layout.tp + tp_rank if self.shared else writer(k, self.dp)
        return File(folder / name if k == 0 else folder / FOLDER / STATES[k - 1] / name,
                    file_skeleton(self.cfg.model, self.layout, tp_rank, self.pp_rank,
                                  self.dtype if k == 0 else torch.float32), creator)

    def _cut(self, i: int) -> "dict[int, OrderedDict[str, Union[torch.Tensor, Rows]]]":
        """This rank's units of file ``i`` (0: the weights; then the ``STATES``), by tensor rank
        (``stage_file``)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        mine = self.owners[i].of(self.dp_rank)
        if i == 0:
            return stage_file(self.cfg, self.layout, self.trainer.chunks, lambda name, p: p, units=mine,
                              spread=self.shared)
        key, zero = STATES[i - 1], self.zero

        def value(name: str, p: torch.nn.Parameter) -> Optional[torch.Tensor]:
            if zero is not None:
                return zero.value(p)
            return safe_get_full_fp32_param(p) if key == "fp32" else safe_get_full_optimizer_state(p, key)

        content = stage_file(self.cfg, self.layout, self.trainer.chunks, value, units=mine, spread=self.shared)
        if zero is not None:
            zero.finish()
            if i < len(STATES):
                zero.start(STATES[i], self.owners[i + 1].params)
        return content


def load_optimizer_state(folder: Path, cfg: InternLMConfig, layout: ParallelLayout, trainer) -> None:
    """Fill ZeRO-1's fp32 partitions and Adam's moments and step from ``folder/optimizer`` (any layout), and
    the model's weights from those fp32 master weights."""
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state
    from megatron.core import parallel_state as ps

    from adapter.checkpoint.errors import CheckpointError
    from adapter.model.mapping import chunk_pieces
    from adapter.train.open_shared import open_folders

    root = folder / FOLDER
    zero = trainer.optimizer
    adam = zero.optimizer
    steps = load_metadata(root / STEPS_FILE)["steps"]
    if len(steps) != len(adam.param_groups):
        raise CheckpointError(f"{root / STEPS_FILE}: {len(steps)} parameter groups, the optimizer has "
                              f"{len(adam.param_groups)}")
    # Adam's state is created at its first step; create it now (``_fresh_state``, filled below) and link
    # ZeRO's per-parameter views into it, as DeepSpeed does before loading a universal checkpoint
    for i, (group, step) in enumerate(zip(adam.param_groups, steps)):
        flat, params = group["params"][0], zero.bit16_groups[i]
        adam.state[flat] = {"step": torch.tensor(float(step)), "exp_avg": _fresh_state(flat, params),
                            "exp_avg_sq": _fresh_state(flat, params)}
        lazy_init_hp_params_optimizer_state(zero.bit16_groups[i], zero.single_partition_of_fp32_groups[i], adam.state)
    pp_rank, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    sources = open_folders([root / key for key in STATES], cfg.model, one_writer=True)
    # every state is cut and its reads queued before the weights wait for the fp32 masters' reads: the
    # disk is kept busy, and the weights cross between ranks while the moments are read
    with mapped.Reads([t for key in STATES for t in _partitions(zero, key)]) as reads:
        for key in STATES:
            source = sources.pop(0)  # dropped after its state is cut: its files are unmapped once they are read
            for vp, chunk in enumerate(trainer.chunks):
                held = {name: p for name, p in chunk.named_parameters() if _in_partition(p)}
                into = {name: whole for name, p in held.items() if (whole := _whole_part(p, key)) is not None}
                for name, value in chunk_pieces(source, cfg.model, layout, pp_rank, vp, tp_rank, keys=held,
                                                into=into.get):
                    _set_part(held.pop(name), value, key)
                if held:
                    raise CheckpointError(f"{root / key}: no {sorted(held)[0]} for pipeline rank {pp_rank}, "
                                          f"chunk {vp}")
            if key == "fp32":
                masters = reads.submitted()
        reads.wait(masters)
        weights = _start_weights_from_masters(zero)
    weights()


def _partitions(zero, key: str) -> list[torch.Tensor]:
    """This rank's ZeRO partitions of state ``key``, one per parameter group: where the load writes it."""
    if key == "fp32":
        return list(zero.single_partition_of_fp32_groups)
    return [zero.optimizer.state[g["params"][0]][key] for g in zero.optimizer.param_groups]


def _set_part(p: torch.nn.Parameter, value: torch.Tensor, key: str) -> None:
    """Set the part of ``p``'s state ``key`` that this rank's ZeRO partition holds from its whole ``value``:
    what DeepSpeed's ``safe_set_full_fp32_param``/``safe_set_full_optimizer_state`` do for ZeRO-1 and 2
    (through the same link, ``_hp_mapping``), with the copy through ``mapped.copy``, which reads a value
    still in a checkpoint file with ``pread`` (most of a load's time went to faulting its pages in)."""
    if not hasattr(p, "_hp_mapping"):  # another DeepSpeed (``_in_partition``): its own API
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        value = value.to(device=p.device, dtype=torch.float32)
        return safe_set_full_fp32_param(p, value) if key == "fp32" else safe_set_full_optimizer_state(p, value, key)
    mapping = p._hp_mapping
    part = mapping.get_hp_fragment(None if key == "fp32" else key).data  # as DeepSpeed: fp32 masters are leaves
    if value.data_ptr() == part.data_ptr() and value.numel() == part.numel():
        return  # joined in place (``_whole_part``)
    address = mapping.lp_fragment_address
    if address.numel == value.numel():  # all of it: a column slice of a file's tensor is read straight there
        mapped.copy(part.view(value.shape), value)
        return
    if not value.is_contiguous():  # a column slice of a file's tensor: read once, then flattened
        value = mapped.read(value)
    mapped.copy(part, value.reshape(-1).narrow(0, address.start, address.numel))


def _whole_part(p: torch.nn.Parameter, key: str) -> Optional[torch.Tensor]:
    """Where this rank's partition holds all of ``p``: its state ``key`` there, in ``p``'s shape, for a value
    joined from several pieces to be joined into directly (``chunk_pieces``'s ``into``); else None."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None or mapping.lp_fragment_address.numel != p.numel():
        return None
    return mapping.get_hp_fragment(None if key == "fp32" else key).data.view(p.shape)


def _fresh_state(flat: torch.Tensor, params: list) -> torch.Tensor:
    """New memory for an Adam state of ZeRO partition ``flat`` (``empty_to_fill``), zero where no parameter's
    part lies (the partition's padding), which the load does not write; the rest is written by the load
    (``_set_part``)."""
    state = empty_to_fill(flat.shape, flat.dtype, flat.device)
    if not all(hasattr(p, "_hp_mapping") for p in params):  # another DeepSpeed (``_in_partition``): zeros
        return state.zero_()
    spans = sorted((p._hp_mapping.hp_fragment_address.start, p._hp_mapping.hp_fragment_address.numel)
                   for p in params if p._hp_mapping is not None)
    at = 0
    for start, n in spans + [(flat.numel(), 0)]:
        if start > at:
            state.narrow(0, at, start - at).zero_()
        at = max(at, start + n)
    return state


def _start_weights_from_masters(zero) -> Callable[[], None]:
    """Start setting the model's weights from ZeRO's fp32 masters, as after a step: each rank casts its
    partition into its part of the flat weights, then they are all-gathered over data parallel, so a resume
    reads no model file (``state_files.weights_from_optimizer``). This is DeepSpeed's ``update_lp_params``
    with its all-gather left running (it takes as long as reading a state: the weights cross the network
    once); the call returned waits for it."""
    requests = []
    with torch.no_grad():
        for i, (parts, fp32, flat, group) in enumerate(zip(zero.parallel_partitioned_bit16_groups,
                                                           zero.single_partition_of_fp32_groups,
                                                           zero.bit16_groups_flat, zero.real_dp_process_group)):
            parts[dist.get_rank(group=group)].copy_(fp32)
            requests += all_gather_into(flat, parts, group, tag=i)

    def wait() -> None:
        for request in requests:
            request.wait()

    return wait


def _in_partition(p: torch.nn.Parameter) -> bool:
    """Whether this rank's ZeRO partition holds a part of ``p``. DeepSpeed links each parameter to its part
    (``_hp_mapping``, None where the partition holds none, and then ``safe_set_full_*`` sets nothing); the
    tensors of the others are not read. Without the attribute (another DeepSpeed), every parameter counts."""
    return getattr(p, "_hp_mapping", True) is not None
