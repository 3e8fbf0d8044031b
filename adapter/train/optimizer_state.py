"""The optimizer state of a training checkpoint, per logical tensor, so that a run resumes at any layout.

DeepSpeed's own ZeRO-1 checkpoint holds each data-parallel rank's flat fp32 partition: it can only be read
back at the layout that wrote it. Here every parameter's fp32 master weight and Adam moments are gathered
whole per tensor rank from ZeRO's partitions, cut into InternEvo's pieces the way the model is
(``stage_file``) and written as three InternEvo-layout model folders beside the weights:

    <checkpoint>/optimizer/fp32/model_tp{t}_pp{p}.pt        fp32 master weights
    <checkpoint>/optimizer/exp_avg/model_tp{t}_pp{p}.pt     Adam's first moment
    <checkpoint>/optimizer/exp_avg_sq/model_tp{t}_pp{p}.pt  Adam's second moment
    <checkpoint>/optimizer/state.pt                        Adam's step per parameter group

so the checkpoint bridge reads them at any tensor/pipeline/virtual layout, like the weights. Loading cuts
each tensor for this rank (``chunk_state_dict``) and hands it to ZeRO's partition through DeepSpeed's
``safe_set_full_*`` API; a state of a parameter is the same whatever the data-parallel size, so the
data-parallel size may change too.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from adapter.checkpoint.formats.internevo import model_config_dict
from adapter.checkpoint.io.memory import zeros_like_huge
from adapter.checkpoint.io.safe_load import load_metadata
from adapter.config.schema import InternLMConfig
from adapter.runtime.layout import ParallelLayout
from adapter.weights.table import Unit

FOLDER = "optimizer"
STATES = ("fp32", "exp_avg", "exp_avg_sq")
STEPS_FILE = "state.pt"


def stage_file(cfg: InternLMConfig, layout: ParallelLayout, chunks: list,
               value: Callable[[str, torch.nn.Parameter], Optional[torch.Tensor]],
               keep: bool = True) -> "OrderedDict[str, torch.Tensor]":
    """This rank's ``model_tp{t}_pp{p}.pt`` content of ``value(name, parameter)`` (collective over the
    tensor group, and over whatever group ``value`` itself talks to). With ``keep`` False (every rank of this
    tensor group passes the same: the data-parallel ranks that do not write this file) ``value`` is still
    called for every parameter, for its own collectives, and may return None; the result is empty.

    Each tensor rank cuts its file's pieces from its own parameters wherever InternEvo's split of a tensor
    is megatron-core's (every linear layer and fused qkv/MLP: the same rows or columns of each atom on the
    same rank; replicated tensors from its own replica), so only the embedding crosses between tensor ranks
    (megatron-core splits it on the vocabulary, InternEvo on the hidden size), each rank receiving just the
    hidden columns it keeps of the others' rows (``_exchange_tensor_ranks``). The pieces are views
    (of the parameters, of DeepSpeed's flat buffers) wherever the cut allows: write them with
    ``stream_write.save_tensors``, which writes each one's own bytes and copies nothing first."""
    from megatron.core import parallel_state as ps

    from adapter.checkpoint.formats.internevo import chunk_prefix, unit_pieces
    from adapter.model.mapping import chunk_units, mcore_table

    model, tp_rank, pp_rank = cfg.model, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for vp, chunk in enumerate(chunks):
        mine: dict[str, torch.Tensor] = {}
        for name, p in chunk.named_parameters():
            v = value(name, p)
            if keep:
                mine[name] = v.detach()
        if not keep:
            continue
        for unit, local in chunk_units(model, layout, pp_rank, vp):
            source = Unit(model, unit, mcore_table(model), layout.tp,
                          lambda stored, key: _gather_tensor_ranks(key, mine[key], layout.tp), local,
                          rank_piece=lambda stored, key, rank: mine[key], local_rank=tp_rank,
                          exchange=lambda stored, key, dim, bounds, join: _exchange_tensor_ranks(
                              key, mine[key], dim, bounds, join))
            pieces = unit_pieces(source, model, layout, local, chunk_prefix(layout, vp), tp_rank)
            out.update((k, v.cpu()) for k, v in pieces)  # host memory for the file (on the CPU: the same views)
    return out


def _gather_tensor_ranks(name: str, t: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Every tensor rank's ``t`` (parameter ``name``), in rank order (its shape checked the same on every rank).

    Not ``all_gather_object``: pickling a tensor writes its whole storage, and DeepSpeed keeps the parameters
    as views of one flat buffer, so each parameter would carry the whole buffer (a model of 40 parameters
    pickled 40 times its size)."""
    if tp == 1:
        return [t]
    from megatron.core import parallel_state as ps

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
    """Whole fp32 masters and Adam moments of parameters, assembled at the data-parallel rank that writes
    them from ZeRO-1's partitions.

    DeepSpeed links each parameter to the part of it this rank's partition holds (``_hp_mapping``: where it
    starts in the parameter, ``lp_fragment_address``, and its fp32 and optimizer-state values,
    ``get_hp_fragment``), the links its own ``safe_get_full_*`` read. Those all-reduce a zero-filled copy of
    the whole parameter over every data-parallel rank; here each rank sends its parts to the one rank that
    writes, point to point, so every element crosses once and nobody else receives or sums anything.

    One state moves at a time: ``start`` posts its transfers without waiting (the sends read ZeRO's buffers
    in place), so they travel while the rank writes the previous file; ``value`` waits for a parameter's
    receives; ``finish`` waits for the rest, and must come before the next ``start`` and before the
    optimizer steps again. Within a state every part flows to one rank, in parameter order, so the
    point-to-point operations of each pair of ranks are posted in the same order on both sides (what NCCL
    needs, whose operations between two ranks run in posting order on one stream). A parameter that the
    writer's partition holds whole is a view of it, not a copy. Values come back in host memory (on an
    accelerator, a copy), and at most ``WINDOW`` bytes of receive buffers are posted ahead of the parameter
    being read (at least one parameter's). Collective over data parallel: every rank constructs it, and
    starts the same states with the same writers in the same order."""

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
        self.key: Optional[str] = None  # the state in flight, its writer and its message tag
        self.writer, self.tag = -1, 0
        self.queue: list[int] = []  # parameters whose receives are not posted yet, in order
        self.receiving: dict[int, tuple[torch.Tensor, list]] = {}
        self.in_flight = 0  # bytes of the buffers in ``receiving``
        self.sends: list = []

    @staticmethod
    def available(chunks: list) -> bool:
        """Whether DeepSpeed linked every parameter to its partition (ZeRO stage 1 or 2)."""
        params = [p for chunk in chunks for p in chunk.parameters()]
        return bool(params) and all(hasattr(p, "_hp_mapping") and getattr(p, "_dp_group", None) is params[0]._dp_group
                                    for p in params)

    def _part(self, p: torch.nn.Parameter) -> Optional[torch.Tensor]:
        mapping = p._hp_mapping
        return None if mapping is None else mapping.get_hp_fragment(None if self.key == "fp32" else self.key)

    def start(self, key: str, writer: int) -> None:
        """Start moving every parameter's ``key`` (``fp32`` or an Adam state) to data-parallel rank ``writer``."""
        self.key, self.writer, self.tag = key, writer, self.tag + 1  # one tag per state (gloo matches by tag)
        if self.rank != writer:
            for p in self.params:
                part = self._part(p)
                if part is not None:
                    self.sends.append(dist.isend(part.contiguous(), dst=self.ranks[writer], group=self.group,
                                                 tag=self.tag))
            return
        self.queue = [i for i, p in enumerate(self.params) if any(
            parts[i] is not None for r, parts in enumerate(self.parts) if r != self.rank)]
        self._post()

    def _post(self) -> None:
        """Post the receives of the next parameters while the buffers in flight fit in ``WINDOW``."""
        while self.queue:
            i = self.queue[0]
            p = self.params[i]
            if self.receiving and self.in_flight + p.numel() * 4 > self.WINDOW:
                return
            self.queue.pop(0)
            whole = torch.empty(p.numel(), dtype=torch.float32, device=p.device)
            requests = []
            for r, parts in enumerate(self.parts):
                if parts[i] is not None and r != self.rank:
                    place = whole.narrow(0, parts[i][0], parts[i][1])
                    requests.append(dist.irecv(place, src=self.ranks[r], group=self.group, tag=self.tag))
            self.receiving[i] = (whole, requests)
            self.in_flight += p.numel() * 4

    def value(self, p: torch.nn.Parameter) -> Optional[torch.Tensor]:
        """``p``'s whole value of the state in flight at its writer, in host memory; None elsewhere."""
        if self.rank != self.writer:
            return None
        i, part = self.index[id(p)], self._part(p)
        if i not in self.receiving and part is not None and part.numel() == p.numel():
            return part.view(p.shape).cpu()  # held whole here: a view (no copy) on the CPU
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
        for _, requests in self.receiving.values():
            for request in requests:
                request.wait()
        for request in self.sends:
            request.wait()
        self.sends, self.queue, self.receiving, self.in_flight = [], [], {}, 0


def has_state(trainer) -> bool:
    """Whether Adam has taken a step (before the first update there is no state to save)."""
    return bool(trainer.optimizer.optimizer.state)


def writer(index: int, dp: int) -> int:
    """The data-parallel rank that writes file ``index`` of a (tensor, pipeline) rank's four: the model (0),
    then the ``STATES`` (1-3). Any data-parallel rank can: the weights are whole on each, and each state is
    assembled where it is written (``ZeroStates``). Spread like this, the files are written side by side."""
    return index % dp


class OptimizerSave:
    """Writing ``<checkpoint>/optimizer``, in two calls so that ZeRO's parts travel while the caller writes
    the weights: the constructor starts moving the first state to the data-parallel rank that writes it
    (``writer(1 + i, dp)``), ``write`` writes them, each state's transfer started before the previous
    state's file is written. Both are collective over all ranks."""

    def __init__(self, trainer):
        from megatron.core import parallel_state as ps

        self.trainer, self.stateful = trainer, has_state(trainer)
        self.dp_rank, self.dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.zero = ZeroStates(trainer.chunks) if self.stateful and ZeroStates.available(trainer.chunks) else None
        if self.zero is not None:
            self.dp_rank = self.zero.rank
            self.zero.start(STATES[0], writer(1, self.dp))

    def write(self, folder: Path, cfg: InternLMConfig, layout: ParallelLayout,
              save: Callable[[object, Path], None]) -> None:
        """Write the states through ``save(obj, path)``, which must write views as their own bytes
        (``stream_write.save_tensors``): the values are views of ZeRO's buffers where they can be."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        from megatron.core import parallel_state as ps

        if not self.stateful:
            return
        tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        zero = self.zero
        for i, key in enumerate(STATES, start=1):
            mine = self.dp_rank == writer(i, self.dp)

            def value(name: str, p: torch.nn.Parameter, key: str = key) -> Optional[torch.Tensor]:
                if zero is not None:
                    return zero.value(p)
                return safe_get_full_fp32_param(p) if key == "fp32" else safe_get_full_optimizer_state(p, key)

            content = stage_file(cfg, layout, self.trainer.chunks, value, keep=mine)
            if zero is not None:
                zero.finish()
                if i < len(STATES):
                    zero.start(STATES[i], writer(i + 1, self.dp))
            if mine:
                target = folder / FOLDER / key
                target.mkdir(parents=True, exist_ok=True)
                save(content, target / f"model_tp{tp_rank}_pp{pp_rank}.pt")
                if tp_rank == 0 and pp_rank == 0:
                    save(model_config_dict(cfg.model), target / "model_config.pt")
            del content
        if dist.get_rank() == 0:
            adam = self.trainer.optimizer.optimizer
            steps = [int(adam.state[group["params"][0]]["step"]) for group in adam.param_groups]
            save({"steps": steps}, folder / FOLDER / STEPS_FILE)


def load_optimizer_state(folder: Path, cfg: InternLMConfig, layout: ParallelLayout, trainer) -> None:
    """Fill ZeRO-1's fp32 partitions and Adam's moments and step from ``folder/optimizer`` (any layout), and
    the model's weights from those fp32 master weights."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state
    from megatron.core import parallel_state as ps

    from adapter.checkpoint.errors import CheckpointError
    from adapter.model.mapping import chunk_state_dict
    from adapter.train.open_shared import open_folders

    root = folder / FOLDER
    zero = trainer.optimizer
    adam = zero.optimizer
    steps = load_metadata(root / STEPS_FILE)["steps"]
    if len(steps) != len(adam.param_groups):
        raise CheckpointError(f"{root / STEPS_FILE}: {len(steps)} parameter groups, the optimizer has "
                              f"{len(adam.param_groups)}")
    # Adam's state is created at its first step; create it now (zeros, then filled below; on huge pages in
    # host memory, where a page fault per 4 KiB costs more than the zeros) and link ZeRO's per-parameter
    # views into it, as DeepSpeed does before loading a universal checkpoint
    for i, (group, step) in enumerate(zip(adam.param_groups, steps)):
        flat = group["params"][0]
        adam.state[flat] = {"step": torch.tensor(float(step)), "exp_avg": zeros_like_huge(flat),
                            "exp_avg_sq": zeros_like_huge(flat)}
        lazy_init_hp_params_optimizer_state(zero.bit16_groups[i], zero.single_partition_of_fp32_groups[i], adam.state)
    pp_rank, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    sources = open_folders([root / key for key in STATES], cfg.model, one_writer=True)
    weights = None
    for key in STATES:
        source = sources.pop(0)  # dropped after its state is set: its files are unmapped, one state mapped at a time
        for vp, chunk in enumerate(trainer.chunks):
            held = {name for name, p in chunk.named_parameters() if _in_partition(p)}
            values = chunk_state_dict(source, cfg.model, layout, pp_rank, vp, tp_rank, keys=held)
            for name, p in chunk.named_parameters():
                if name in held:
                    value = values.pop(name).to(device=p.device, dtype=torch.float32)
                    if key == "fp32":
                        safe_set_full_fp32_param(p, value)
                    else:
                        safe_set_full_optimizer_state(p, value, key)
                    del value
        if key == "fp32":  # the weights travel while the moments are read
            weights = _start_weights_from_masters(zero)
    weights()


def _start_weights_from_masters(zero) -> Callable[[], None]:
    """Start setting the model's weights from ZeRO's fp32 masters, as after a step: each rank casts its
    partition into its part of the flat weights, then they are all-gathered over data parallel, so a resume
    reads no model file (``state_files.weights_from_optimizer``). This is DeepSpeed's ``update_lp_params``
    with its all-gather left running (it takes as long as reading a state: the weights cross the network
    once); the call returned waits for it."""
    requests = []
    with torch.no_grad():
        for parts, fp32, flat, group in zip(zero.parallel_partitioned_bit16_groups,
                                            zero.single_partition_of_fp32_groups, zero.bit16_groups_flat,
                                            zero.real_dp_process_group):
            rank = dist.get_rank(group=group)
            parts[rank].copy_(fp32)
            if dist.get_world_size(group=group) > 1:
                requests.append(dist.all_gather_into_tensor(flat, parts[rank], group=group, async_op=True))

    def wait() -> None:
        for request in requests:
            request.wait()

    return wait


def _in_partition(p: torch.nn.Parameter) -> bool:
    """Whether this rank's ZeRO partition holds a part of ``p``. DeepSpeed links each parameter to its part
    (``_hp_mapping``, None where the partition holds none, and then ``safe_set_full_*`` sets nothing); the
    tensors of the others are not read. Without the attribute (another DeepSpeed), every parameter counts."""
    return getattr(p, "_hp_mapping", True) is not None
