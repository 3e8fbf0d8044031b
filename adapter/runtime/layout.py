"""The parallel plan: how ranks and layers are laid out (torch-free).

Rank order follows megatron-core's default ``tp-cp-ep-dp-pp`` (tensor fastest, pipeline slowest), which
is also InternEvo's ``global_rank = pp_rank*(tp*dp) + dp_rank*tp + tp_rank``. Layers are assigned to
pipeline stages and virtual chunks exactly as InternEvo's ``partition_uniform`` does, so checkpoints and
schedules line up with InternEvo's.
"""

from __future__ import annotations

from dataclasses import dataclass


def partition_uniform(num_layers: int, pipeline_size: int, num_chunks: int) -> list[list[tuple[int, int]]]:
    """InternEvo's layer partition (``core/parallel/shard.py``).

    The layers are cut into ``num_chunks`` consecutive blocks, and each block is split over the pipeline
    ranks with the remainder going to the **last** ranks. Returns ``parts[pp_rank][chunk] = (start, end)``.

    >>> partition_uniform(30, 4, 1)
    [[(0, 7)], [(7, 14)], [(14, 22)], [(22, 30)]]
    >>> partition_uniform(32, 4, 2)[0]
    [(0, 4), (16, 20)]
    """
    from adapter.config.errors import ConfigError  # here: importing adapter.config imports this module

    if num_layers % num_chunks:
        raise ConfigError("model.num_layers", f"{num_layers} layers cannot be cut into {num_chunks} equal chunks "
                          f"(model.num_chunks); InternEvo requires num_layers % num_chunks == 0")
    per_chunk = num_layers // num_chunks
    base, extra = divmod(per_chunk, pipeline_size)
    if base == 0:
        raise ConfigError("model.num_layers", f"{num_layers} layers over {pipeline_size} pipeline stages × "
                          f"{num_chunks} chunks leaves some stage without a layer")
    first_with_extra = pipeline_size - extra
    parts: list[list[tuple[int, int]]] = [[] for _ in range(pipeline_size)]
    for chunk in range(num_chunks):
        start = chunk * per_chunk
        for rank in range(pipeline_size):
            size = base + (rank >= first_with_extra)
            parts[rank].append((start, start + size))
            start += size
    return parts


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of every parallel dimension for one run.

    Attributes:
        tp, pp, vpp: tensor, pipeline and virtual-pipeline (chunks per stage) sizes.
        dp: data-parallel size, ``world_size // (tp * pp)``; ``None`` when no world size is known.
        zero1: ranks that share one optimizer-state partition group (InternEvo's ``zero1``, resolved).
        sequence_parallel: megatron sequence parallelism (only meaningful with tp > 1).
        stages: ``stages[pp_rank][chunk] = (first_layer, end_layer)``.
    """

    tp: int
    pp: int
    vpp: int
    dp: int | None
    zero1: int | None
    sequence_parallel: bool
    stages: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def world_size(self) -> int | None:
        return None if self.dp is None else self.tp * self.pp * self.dp

    @property
    def even(self) -> bool:
        """True when every (stage, chunk) holds the same number of layers."""
        return len({end - start for stage in self.stages for start, end in stage}) == 1

    def layers_per_chunk(self) -> list[list[int]]:
        return [[end - start for start, end in stage] for stage in self.stages]
