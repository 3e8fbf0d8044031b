"""Open a resume's InternEvo-layout folders on every rank, each folder checked by one rank.

A resume reads up to four such folders (the model and the three optimizer states), each on every rank. The
thorough check of a folder (``LazyTensors.validate``: every file's structure, every key, shape and dtype, the
replicas' bytes) opens all of its files, and opening a file is most of what reading a small one costs (its
pickled structure, one record lookup per tensor). Done on every rank, a tp=2 × pp=2 resume opened all 16
files four times over.
Here each pipeline stage of each folder (its files, all tensor ranks) is checked by one rank, the stages
dealt out to the ranks in turn, and the verdict shared, so a broken folder still stops every rank with the
same one line before anything is loaded; the other ranks open only the files they read (of a replicated
tensor, one replica's). Folders of one writer (the optimizer states) share its layout, found once
(``InternEvoCheckpoint.sibling``): the checks of their stages' files (every key and shape the layout gives)
find one written at another layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch.distributed as dist

from adapter.checkpoint.errors import CheckpointError
from adapter.checkpoint.formats.internevo import InternEvoCheckpoint, LazyTensors, read_internevo
from adapter.config.schema import ModelConfig


def open_folders(paths: list[Path], model: ModelConfig, one_writer: bool, first: int = 0) -> list[LazyTensors]:
    """The folders' tensors, read lazily; collective over all ranks. ``one_writer``: the folders hold one
    layout (the first folder's). The pipeline stages of the folders, numbered folder after folder, are
    checked in turn by the ranks from ``first`` on (stage ``s`` of them on rank ``(first + s) % world``). A
    failure stops every rank: the rank that found it raises its own error, the others a CheckpointError
    quoting it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    opened: list[LazyTensors] = []
    failure: Optional[Exception] = None
    base: Optional[InternEvoCheckpoint] = None
    stage = first  # the number of the next folder's first stage
    for path in paths:
        try:
            # a sibling of another layout is found by the checks of its stages' files
            ckpt = base.sibling(path) if base is not None and one_writer else read_internevo(path, model)
            mine = _checked_here(stage, ckpt.pp, rank, world)
            base = base or ckpt
            stage += ckpt.pp
            lazy = ckpt.lazy()
            if mine:
                lazy.validate(mine)
            opened.append(lazy)
        except Exception as exc:  # every rank must reach the verdict below, whatever went wrong here
            failure = failure or exc
    verdicts: list = [None] * world
    dist.all_gather_object(verdicts, None if failure is None else f"{failure}")
    if failure is not None:
        raise failure
    found = next((v for v in verdicts if v), None)
    if found is not None:
        raise CheckpointError(found)
    for lazy in opened:  # every stage was checked, its replicas compared, on some rank
        lazy.replicas_compared.update(range(lazy.ckpt.pp))
    return opened


def _checked_here(stage: int, pp: int, rank: int, world: int) -> set[int]:
    """Which of a folder's ``pp`` stages, numbered from ``stage`` on, this rank checks."""
    return {p for p in range(pp) if (stage + p) % world == rank}
