"""Model families as plug-ins: each module declares what differs between families, everything else looks
it up here (see ``README.md`` in this folder for adding one).

A family says: its InternEvo ``model_type``; its InternEvo tensor table (names, fused or separate q/k/v,
file order: this is also the adapter's *logical* state dict, InternEvo's tp=1 tensors); how its InternEvo
files are recognised; whether its config has grouped-query attention keys; and its Hugging Face tables (the
first is what exports write, every one is accepted on import).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from adapter.config.schema import ModelConfig
from adapter.weights.table import Table


@dataclass(frozen=True)
class Family:
    name: str
    """``ModelConfig.family``."""
    model_type: str
    """InternEvo's ``model_type``."""
    internevo: Callable[[ModelConfig], Table]
    """InternEvo's tensors at tp=1, pp=1 (the logical state dict), in file order."""
    marker: str
    """A key fragment only this family's InternEvo files have."""
    hf: tuple[Callable[[ModelConfig], Table], ...]
    """Hugging Face tables: exports write the first, imports accept any."""
    hf_architecture: Optional[str] = None
    """The remote-code ``architectures`` entry of the family's published HF checkpoints, if any."""
    gqa: bool = True
    """Whether the config has ``num_kv_attention_heads`` and ``no_bias`` (InternLM1 has neither)."""


def _registry() -> dict[str, Family]:
    from adapter.families import internlm1, internlm2, llama2

    return {f.name: f for f in (internlm1.FAMILY, internlm2.FAMILY, llama2.FAMILY)}


FAMILIES: dict[str, Family] = _registry()


def family(name: str) -> Family:
    """The family called ``name`` (``ModelConfig.family``)."""
    return FAMILIES[name]


def logical_table(model: ModelConfig) -> Table:
    """The model's logical state dict: its family's InternEvo tensors at tp=1, pp=1."""
    return FAMILIES[model.family].internevo(model)


def recognise_internevo(keys: list[str]) -> Optional[Family]:
    """The family whose InternEvo files hold these keys."""
    return next((f for f in FAMILIES.values() if any(f.marker in k for k in keys)), None)
