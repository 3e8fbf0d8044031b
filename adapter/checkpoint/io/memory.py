"""Giving memory back to the operating system during a streaming conversion (Linux/glibc; no-ops elsewhere).

A conversion's resident memory should be what it currently holds, and filling new memory should not cost
more than the copy. Two things keep memory higher otherwise:
pages of memory-mapped source files stay mapped after they are read, and glibc keeps freed heap blocks
(tensors below its mmap threshold, e.g. tensor-parallel pieces of 10-30 MB) in its arenas, where freeing
pieces of different sizes in turn fragments them, so the resident set creeps up unit after unit.
"""

from __future__ import annotations

import ctypes
import math
import mmap
from typing import Sequence

import torch

_PAGE = mmap.PAGESIZE
_CPU = torch.device("cpu")
_MADV_DONTNEED = 4
_MADV_HUGEPAGE = 14


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise  # noqa: B018 - absent on some platforms
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def _madvise(t: torch.Tensor, advice: int) -> None:
    if _LIBC is None:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first, last = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE  # whole pages inside the tensor only
    if last > first:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(advice))


#: the size of a huge page: smaller tensors gain nothing from ``empty_huge``
HUGE = 2 << 20


def empty_huge(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty`` whose pages are backed by transparent huge pages where the kernel allows it
    (``MADV_HUGEPAGE`` before the first touch). Filling fresh memory costs a page fault per 4 KiB page
    otherwise: on the bench machine a copy into new memory ran at 2.4 GB/s on small pages, 7.7 GB/s on huge."""
    t = torch.empty(shape, dtype=dtype)
    _madvise(t, _MADV_HUGEPAGE)
    return t


def empty_to_fill(shape: Sequence[int], dtype: torch.dtype, device: torch.device = _CPU) -> torch.Tensor:
    """New memory that a copy is about to fill (pieces joined, a file's bytes read): a large one in host
    memory goes on huge pages (``empty_huge``), where a page fault per 4 KiB written costs more than the copy."""
    if device.type == "cpu" and math.prod(shape) * dtype.itemsize >= HUGE:
        return empty_huge(tuple(shape), dtype)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def drop_pages(t: torch.Tensor) -> None:
    """``madvise(MADV_DONTNEED)`` over ``t``'s pages. Only for tensors memory-mapped read-only from a file
    (``torch.load(mmap=True)``, never written): their pages are clean copies of the file, so dropping them
    loses nothing (a later read faults them back in from the page cache)."""
    _madvise(t, _MADV_DONTNEED)


def trim_heap() -> None:
    """Return freed heap memory to the operating system (glibc's ``malloc_trim``)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(ctypes.c_size_t(0))

