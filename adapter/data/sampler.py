"""InternEvo's ``StaticBatchSampler``: which packed rows each data-parallel rank trains on, step by step.

Indices over all packed rows are shuffled with ``RandomState(data.seed)``, truncated to whole global batches
(ramp-up included), and rank ``r`` takes ``indices[r::dp]``; a batch is ``micro_num`` rows (fewer during
``rampup_batch_size``). After an epoch the same generator shuffles again.

The state, as InternEvo's, names the epoch by the generator's state before its shuffle (plus how many rows
the epoch keeps) instead of holding the epoch's index array, which a restore shuffles again: a checkpoint
costs a few kilobytes at any size (the array as a Python list took 40 s and 9 GiB a save at a trillion
tokens; even as a tensor it is 8 bytes a row). The generator's key is a tensor, so the state is saved with
``torch.save`` and read back with ``weights_only=True``. States that hold the index array (a list, as
written before, or a tensor) load too.
"""

from __future__ import annotations

import copy
from typing import Iterator, Optional

import numpy as np
import torch


def rng_to_saved(rng_state: tuple) -> list:
    """A ``RandomState.get_state()`` tuple with its key as an int64 tensor, which ``weights_only`` loads."""
    name, keys, pos, has_gauss, cached = rng_state
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def rng_from_saved(saved: list) -> tuple:
    """Back to ``RandomState.set_state``'s tuple, from a key saved as a tensor or (before) as a list."""
    name, keys, pos, has_gauss, cached = saved
    return name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached


class BatchSampler:
    def __init__(self, num_samples: int, batch_size: int, rampup: Optional[tuple[int, int, int]], seed: int,
                 dp_rank: int, dp_size: int, state: dict | None = None):
        """``state``: a ``state_dict`` to resume from (instead of shuffling the first epoch only to replace it)."""
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.start, self.incr, self.every = rampup if rampup else (batch_size, batch_size, 1)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.rng = np.random.RandomState(seed)
        self.batch_count = 0
        self.consumed = 0
        self.epoch = 0
        if state is None:
            self._new_epoch()
        else:
            self.load_state_dict(state)

    def _ramp_samples(self) -> int:
        steps = (self.batch_size - self.start) // self.incr if self.incr else 0
        if self.batch_count >= steps * self.every:
            return -1
        return sum((i * self.incr + self.start) * self.every for i in range(steps))

    def _epoch_size(self) -> int:
        per_step = self.batch_size * self.dp_size
        ramp = self._ramp_samples()
        if ramp >= 0:
            count = (self.num_samples - ramp * self.dp_size) // per_step * per_step + ramp * self.dp_size
        else:
            count = self.num_samples // per_step * per_step
        if count < self.batch_size:
            raise ValueError(f"{self.num_samples} packed rows are fewer than one batch of {self.batch_size} "
                             f"per rank × {self.dp_size} data-parallel ranks")
        return count

    def _shuffle(self, size: int) -> None:
        """This epoch's indices: ``size`` of all rows, shuffled by the generator as it stands, whose state is kept
        as ``epoch_start`` for checkpoints (int32 below 2**31 rows: the permutation depends only on the count,
        and half the bytes shuffle faster)."""
        self.epoch_start = self.rng.get_state()
        indices = np.arange(self.num_samples, dtype=np.int32 if self.num_samples < 2**31 else np.int64)
        self.rng.shuffle(indices)
        self.indices = indices[:size]

    def _new_epoch(self) -> None:
        self._shuffle(self._epoch_size())
        self.consumed = 0

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            mine = self.indices[self.dp_rank::self.dp_size]
            while self.consumed < len(mine):
                size = min((self.batch_count // self.every) * self.incr + self.start, self.batch_size)
                batch = mine[self.consumed:self.consumed + size]
                self.consumed += len(batch)
                self.batch_count += 1
                yield [int(i) for i in batch]
            self.epoch += 1
            self._new_epoch()

    def _regroup(self, state: dict) -> int:
        """This rank's rows consumed in the epoch, from a state saved at another data-parallel size. A global
        batch (rows per rank × ranks) that stays the same reads the same rows in the same steps: rank ``r``
        takes ``indices[r::dp]``, so a step's rows are the next global batch of the epoch's order, however
        they are dealt; the epoch's length (whole global batches) is unchanged too. Anything else would change
        which rows a step trains on, and is refused."""
        saved_dp, saved_batch = state["data_world_size"], state.get("batch_size")
        if saved_batch is None or self.start != self.batch_size:
            raise ValueError(f"the sampler state was saved at data-parallel size {saved_dp}, not {self.dp_size}; "
                             "resuming at another size needs a state that records its batch size and no ramp-up")
        if saved_batch * saved_dp != self.batch_size * self.dp_size:
            raise ValueError(f"the sampler state was saved at data-parallel size {saved_dp} with {saved_batch} rows "
                             f"per rank (a global batch of {saved_batch * saved_dp}); now {self.dp_size} × "
                             f"{self.batch_size} = {self.batch_size * self.dp_size}: keep the global batch "
                             "(data.micro_num × data-parallel size) to resume")
        return state["consumed"] * saved_dp // self.dp_size

    def lookahead(self) -> BatchSampler:
        """An independent copy at the same position (its own generator; the epoch's index array is shared, as
        no sampler writes into it), for data-loader workers to read ahead of the batches trained on."""
        twin = copy.copy(self)
        twin.rng = np.random.RandomState()
        twin.rng.set_state(self.rng.get_state())
        return twin

    def state_dict(self) -> dict:
        state = {"batch_count": self.batch_count, "consumed": self.consumed, "epoch": self.epoch, "seed": self.seed,
                 "data_world_size": self.dp_size, "batch_size": self.batch_size, "num_samples": self.num_samples}
        if self.epoch_start is None:  # resumed from a state that held the index array: hand that on
            return {**state, "indices": torch.from_numpy(np.ascontiguousarray(self.indices)),
                    "rng_state": rng_to_saved(self.rng.get_state())}
        return {**state, "epoch_size": len(self.indices), "epoch_rng_state": rng_to_saved(self.epoch_start)}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"the sampler state was saved with data.seed {state['seed']}, not {self.seed}")
        if state.get("num_samples", self.num_samples) != self.num_samples:
            raise ValueError(f"the sampler state was saved over {state['num_samples']} packed rows; the data "
                             f"now has {self.num_samples}")
        self.batch_count, self.consumed, self.epoch = state["batch_count"], state["consumed"], state["epoch"]
        if state["data_world_size"] != self.dp_size:
            self.consumed = self._regroup(state)
        if "indices" in state:
            self.indices = np.asarray(state["indices"], dtype=np.int64)  # a tensor (shared, not copied) or a list
            self.rng.set_state(rng_from_saved(state["rng_state"]))
            self.epoch_start = None
        else:
            self.rng.set_state(rng_from_saved(state["epoch_rng_state"]))
            self._shuffle(state["epoch_size"])  # leaves the generator where the saving sampler's was
