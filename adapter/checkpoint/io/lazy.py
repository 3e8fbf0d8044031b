"""A logical state dict read lazily, one model unit at a time, for sources that store units together.

In Hugging Face and Megatron files (legacy and ``torch_dist``) a logical tensor is not a slice of one
stored tensor: InternEvo's fused qkv is three HF tensors, ``w1``/``w3`` are halves of megatron's
``linear_fc1``. Such sources compute
a whole unit (``model_units``: the embedding, one layer, or the final norm and head) at once and keep it
until a tensor of another unit is asked for, so a streaming conversion, which asks unit by unit, reads
every stored tensor once and holds one unit.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch

from adapter.config.schema import ModelConfig
from adapter.model.mapping import model_units


class UnitSource(Mapping[str, torch.Tensor]):
    """Subclasses give ``logical_meta`` (every logical key, in model order, as a ``meta`` tensor) and
    ``_read_unit``; the previous unit is let go before the next one is read."""

    def __init__(self, model: ModelConfig, logical_meta: dict[str, torch.Tensor]):
        self.model, self.logical_meta = model, logical_meta
        self.unit_of = {key: u for u, keys in enumerate(model_units(model)) for key in keys}
        self.unit, self.cache = -1, {}

    def _read_unit(self, unit: int) -> dict[str, torch.Tensor]:
        """The logical tensors of ``unit``, read from the files."""
        raise NotImplementedError

    def meta(self, key: str) -> torch.Tensor:
        """``key``'s shape and dtype, without reading data."""
        return self.logical_meta[key]

    def __getitem__(self, key: str) -> torch.Tensor:
        unit = self.unit_of[key]
        if unit != self.unit:
            self.unit, self.cache = unit, {}
            self.cache = self._read_unit(unit)
        return self.cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.logical_meta)

    def __len__(self) -> int:
        return len(self.logical_meta)
