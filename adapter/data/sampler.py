"""InternEvo's ``StaticBatchSampler``: which packed rows each data-parallel rank trains on, step by step.

Indices over all packed rows are shuffled with ``RandomState(data.seed)``, truncated to whole global batches
(ramp-up included), and rank ``r`` takes ``indices[r::dp]``; a batch is ``micro_num`` rows (fewer during
``rampup_batch_size``). After an epoch the same generator shuffles again. The state holds the epoch's index
array and the generator's key as tensors (torch saves those at disk speed; a list of Python ints took 40 s
and 9 GiB a save at a trillion tokens), so it is saved with ``torch.save`` and read back with
``weights_only=True``; states saved as lists load too.
"""

from __future__ import annotations

import copy
from typing import Iterator, Optional

import numpy as np
import torch


class BatchSampler:
    def __init__(self, num_samples: int, batch_size: int, rampup: Optional[tuple[int, int, int]], seed: int,
                 dp_rank: int, dp_size: int):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.start, self.incr, self.every = rampup if rampup else (batch_size, batch_size, 1)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.rng = np.random.RandomState(seed)
        self.batch_count = 0
        self.consumed = 0
        self.epoch = 0
        self._new_epoch()

    def _ramp_samples(self) -> int:
        steps = (self.batch_size - self.start) // self.incr if self.incr else 0
        if self.batch_count >= steps * self.every:
            return -1
        return sum((i * self.incr + self.start) * self.every for i in range(steps))

    def _new_epoch(self) -> None:
        indices = np.arange(self.num_samples)
        self.rng.shuffle(indices)
        per_step = self.batch_size * self.dp_size
        ramp = self._ramp_samples()
        if ramp >= 0:
            count = (self.num_samples - ramp * self.dp_size) // per_step * per_step + ramp * self.dp_size
        else:
            count = self.num_samples // per_step * per_step
        if count < self.batch_size:
            raise ValueError(f"{self.num_samples} packed rows are fewer than one batch of {self.batch_size} "
                             f"per rank × {self.dp_size} data-parallel ranks")
        self.indices = indices[:count]
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

    def lookahead(self) -> BatchSampler:
        """An independent copy at the same position (its own generator; the epoch's index array is shared, as
        no sampler writes into it), for data-loader workers to read ahead of the batches trained on."""
        twin = copy.copy(self)
        twin.rng = np.random.RandomState()
        twin.rng.set_state(self.rng.get_state())
        return twin

    def state_dict(self) -> dict:
        name, keys, pos, has_gauss, cached = self.rng.get_state()
        return {"batch_count": self.batch_count, "consumed": self.consumed, "epoch": self.epoch, "seed": self.seed,
                "data_world_size": self.dp_size, "indices": torch.from_numpy(np.ascontiguousarray(self.indices)),
                "rng_state": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                              float(cached)]}

    def load_state_dict(self, state: dict) -> None:
        if state["data_world_size"] != self.dp_size or state["seed"] != self.seed:
            raise ValueError("the sampler state was saved with a different data-parallel size or seed")
        self.batch_count, self.consumed, self.epoch = state["batch_count"], state["consumed"], state["epoch"]
        self.indices = np.asarray(state["indices"], dtype=np.int64)  # a tensor (shared, not copied) or a list
        name, keys, pos, has_gauss, cached = state["rng_state"]
        self.rng.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
