"""Load checkpoint files without executing anything they contain.

Model files are plain tensors and load with ``torch.load(weights_only=True)`` (memory-mapped, so a reader
only pages in the tensors it touches). InternEvo's ``model_config.pt`` is a pickled
``internlm...Config`` (a ``dict`` subclass holding a ``torch.dtype``), which ``weights_only`` refuses; it is
read with an unpickler that resolves exactly an allow-list of names (that ``Config`` as a plain ``dict``,
torch dtypes, ``OrderedDict``) and refuses every other global, so a malicious pickle fails instead of
running code.
"""

from __future__ import annotations

import collections
import os
import pickle
import types
from pathlib import Path
from typing import Any

import torch

_DTYPES = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64", "half", "float")}


class _InternEvoConfig(dict):
    """What ``internlm.core.context.parallel_context.Config`` is read as."""


_ALLOWED = {
    ("internlm.core.context.parallel_context", "Config"): _InternEvoConfig,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): dtype for name, dtype in _DTYPES.items()},
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file asked to load a name outside the allow-list."""


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(f"refusing to load {module}.{name}: not on the allow-list of objects "
                                        "InternEvo stores in checkpoint metadata") from None


_pickle_module = types.ModuleType("adapter_safe_pickle")
_pickle_module.Unpickler = _Unpickler  # type: ignore[attr-defined]
_pickle_module.load = pickle.load  # type: ignore[attr-defined]
_pickle_module.__name__ = "adapter_safe_pickle"


def load_tensors(path: str | os.PathLike, *, mmap: bool = True) -> dict[str, torch.Tensor]:
    """A model file: tensors only, memory-mapped."""
    return torch.load(Path(path), map_location="cpu", weights_only=True, mmap=mmap)


def load_metadata(path: str | os.PathLike) -> Any:
    """A small InternEvo metadata file (``model_config.pt``, ``*.step``, ``context.pt``) through the allow-list.

    ``Config`` objects come back as plain dicts."""
    obj = torch.load(Path(path), map_location="cpu", weights_only=False, pickle_module=_pickle_module)
    return _plain(obj)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def load_deepspeed_file(path: str | os.PathLike, map_location: Any = None) -> Any:
    """DeepSpeed's own checkpoint files, with ``weights_only=True`` and the three DeepSpeed classes its ZeRO
    optimizer files hold allow-listed (DeepSpeed itself loads them with ``weights_only=False``)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)
