"""The few private torch APIs the checkpoint I/O relies on, in one place and checked against torch's version.

The stream writers produce files byte-compatible with ``torch.save`` without holding a whole file, and the
``torch_dist`` reader reads one record of a ``torch.save`` blob by offset; both need torch's own zip
reader/writer (``torch._C.PyTorchFileWriter``/``PyTorchFileReader``) and the pickle helpers ``torch.save``
uses (``_rebuild_tensor_v2``, the dtype → storage-type map, the storage alignment record). They are
checked on the torch versions in ``SUPPORTED_TORCH`` (the test that ``data.pkl`` is byte-identical to
``torch.save``'s holds them to it); another version is refused with one clear error rather than risking a
file that loads wrongly.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

SUPPORTED_TORCH = ((2, 6), (2, 14))  # [lower, upper): setup.cfg's torch>=2.6 up to the newest checked


def check_version(version: str = torch.__version__) -> None:
    """Refuse a torch outside ``SUPPORTED_TORCH``."""
    parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    lower, upper = SUPPORTED_TORCH
    if not lower <= parts < upper:
        raise RuntimeError(f"torch {version}: the checkpoint writers use torch's private zip writer and pickle "
                           f"helpers, checked on torch {lower[0]}.{lower[1]} to {upper[0]}.{upper[1] - 1}; "
                           "convert with a torch in that range")


def zip_writer(path: str) -> Any:
    check_version()
    return torch._C.PyTorchFileWriter(path)


def zip_reader(file: Any) -> Any:
    check_version()
    return torch._C.PyTorchFileReader(file)


def rebuild_tensor() -> Callable:
    """What ``torch.save`` pickles as a tensor's constructor."""
    return torch._utils._rebuild_tensor_v2


def storage_type(dtype: torch.dtype) -> Any:
    """The typed-storage class ``torch.save`` names for ``dtype``."""
    return getattr(torch, torch.storage._dtype_to_storage_type_map()[dtype])


def storage_alignment() -> Optional[str]:
    """The ``.storage_alignment`` record newer ``torch.save`` writes (None on versions without it)."""
    get = getattr(torch.serialization, "_get_storage_alignment", None)
    return str(get()) if get is not None else None
