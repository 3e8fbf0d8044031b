"""InternEvo configs: load safely, normalise, validate (all torch-free), then translate.

Typical use::

    from adapter.config import read_config
    cfg, layout = read_config("internlm_configs/7B_demo.py", world_size=64)

The translators live in ``to_deepspeed``, ``to_mcore`` (imports torch and megatron-core),
``to_megatron_args`` and ``report``.
"""

from __future__ import annotations

import os

from adapter.config.errors import ConfigError
from adapter.config.load import RawConfig, load_config
from adapter.config.normalize import normalize
from adapter.config.schema import InternLMConfig
from adapter.config.validate import validate
from adapter.runtime.layout import ParallelLayout

__all__ = ["ConfigError", "InternLMConfig", "ParallelLayout", "RawConfig", "load_config", "normalize",
           "read_config", "validate"]


def read_config(path: str | os.PathLike, *, trust: bool = False,
                world_size: int | None = None) -> tuple[InternLMConfig, ParallelLayout]:
    """Load, normalise and validate a config file; see ``load_config`` for ``trust``."""
    cfg = normalize(load_config(path, trust=trust))
    return cfg, validate(cfg, world_size)
