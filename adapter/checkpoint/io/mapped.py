"""Copying out of memory-mapped checkpoint files with ``pread`` instead of page faults.

``torch.load(mmap=True)`` reads a file's pickled structure only; a tensor's bytes come in when it is touched,
a page fault per 4 KiB page (a few pages more with the kernel's read-ahead). Copying from a cold mapping that
way ran at a third to half the rate of ``read()`` of the same bytes on the bench machine, and joining a
tensor's pieces from several files (a resharded load) is mostly such copies. So the files a reader maps are
*tracked* (``track``, called by ``safe_load.load_tensors``): each keeps a descriptor of the very file it
mapped, and ``copy(dst, src)`` reads a mapped ``src`` with ``preadv``: straight into ``dst`` where both are
contiguous and alike, or rows of one dtype (a column piece: each row read into its place), else into a
buffer laid out like the file (a block of rows at a time) and copied from there. Anything else is
``dst.copy_(src)``. Inside a ``Reads`` block those reads run on threads, queued, while the caller cuts the
next tensors (a resume or a start from weights: memory nothing reads before the block ends).

Why it reads the right bytes: a file's place in memory is learnt from the kernel (the line of
``/proc/self/maps`` holding one of its tensors, whose device and inode must be the descriptor's), or from
the caller that mapped it (``safe_load.load_tensors_like``: the storage it mapped the file into), and a
tensor finds its file only as one of the file's own tensors or a view of one (which holds that tensor),
alive and so keeping the mapping alive: that memory cannot have been unmapped and reused by another mapping. Checkpoint
tensors are read, never written (a private mapping of a file written once), so the file holds what the
mapping shows. Elsewhere than Linux nothing is tracked.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import ctypes
import errno
import os
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Mapping, Optional

import torch

from adapter.checkpoint.io.memory import empty_to_fill

_MAPS = "/proc/self/maps"
#: a strided piece is read through a buffer only when its bytes span at most this many times its size
#: (a column of a wide matrix is cheaper to fault in than to read whole)
_SPAN = 2
#: the bytes of rows a strided copy reads at a time
_BLOCK = 256 << 10
#: ``preadv``'s limit on buffers per call (Linux's ``IOV_MAX``)
_IOV_MAX = 1024
#: rows shorter than this are read through a buffer: a buffer per row costs the kernel more than the copy
#: it saves (the same time at 1 KiB rows in the bench's warm resharded loads, 10% less at 2 KiB)
_ROW_MIN = 1 << 10


def _libc_preadv() -> Optional[Callable[..., int]]:
    """libc's ``preadv``, for a list of buffers given as a tensor of addresses and lengths (``_scatter``)."""
    try:
        preadv = ctypes.CDLL(None, use_errno=True).preadv
    except (OSError, TypeError, AttributeError):  # no libc of this kind: nothing is tracked there either
        return None
    preadv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    preadv.restype = ctypes.c_ssize_t
    return preadv


_LIBC_PREADV = _libc_preadv()


class _File:
    """One mapped file: a descriptor of it and, once ``_locate`` has found it, the address of its byte 0."""

    def __init__(self, path: str | os.PathLike, probe: int):
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        stat = os.fstat(self.fd)
        self.device, self.inode, self.size = stat.st_dev, stat.st_ino, stat.st_size
        self.probe = probe  # an address inside the mapping (one tensor's data)
        self.base: Optional[int] = None  # None: not looked up yet; -1: not this file's mapping
        self._close = weakref.finalize(self, os.close, self.fd)


_FILES: "weakref.WeakSet[_File]" = weakref.WeakSet()
#: ``id`` of each tracked tensor → (a weak reference to it, its file's record): a record lives while one of
#: its file's tensors does (nothing is attached to the tensors, which ``torch.save`` would pickle)
_TENSORS: dict[int, tuple[weakref.ref, _File]] = {}


def track(tensors: Mapping[str, Any], path: str | os.PathLike, base: Optional[int] = None) -> None:
    """Record that ``tensors`` (what ``torch.load(path, mmap=True)`` returned) are mapped from ``path``; ``base``:
    the address of the file's byte 0 where the caller mapped it (else found in ``/proc/self/maps``)."""
    held = [t for t in tensors.values() if isinstance(t, torch.Tensor) and t.device.type == "cpu"
            and t.untyped_storage().nbytes() > 0]
    if not held or not os.path.exists(_MAPS):
        return
    try:
        record = _File(path, held[0].untyped_storage().data_ptr())
    except OSError:  # out of descriptors (a conversion keeps its source files open): copied from the mapping
        return
    record.base = base
    for t in held:
        _TENSORS[id(t)] = (weakref.ref(t, _forget(id(t))), record)
    _FILES.add(record)


def _forget(key: int) -> Callable[[weakref.ref], None]:
    """The callback that drops tensor ``key``'s entry when the tensor goes."""
    def forget(ref: weakref.ref) -> None:
        if _TENSORS.get(key, (None,))[0] is ref:
            del _TENSORS[key]
    return forget


def _locate() -> None:
    """Find the mappings of the files not looked up yet (one read of ``/proc/self/maps`` for all of them)."""
    waiting = [f for f in _FILES if f.base is None]
    if not waiting:
        return
    with open(_MAPS) as maps:
        lines = maps.read().splitlines()
    for f in waiting:
        f.base = -1
        for line in lines:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= f.probe < end:
                major, minor = (int(x, 16) for x in fields[3].split(":"))
                if (os.makedev(major, minor), int(fields[4])) == (f.device, f.inode):
                    f.base = start - int(fields[2], 16)
                break


def _span(t: torch.Tensor) -> int:
    """How many elements ``t``'s strided layout spans, from its first to its last."""
    return sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1


def _find(t: torch.Tensor) -> Optional[tuple[_File, int]]:
    """The tracked file ``t`` is mapped from (``t`` is one of its tensors or a view of one, which holds that
    tensor and so the mapping), and the offset of ``t``'s first byte in it."""
    root = t if t._base is None else t._base
    ref, f = _TENSORS.get(id(root), (None, None))
    if ref is None or ref() is not root or t.device.type != "cpu" or t.numel() == 0:
        return None
    if f.base is None:
        _locate()
    ptr = t.data_ptr()
    extent = _span(t) * t.element_size()
    if f.base < 0 or not f.base <= ptr <= ptr + extent <= f.base + f.size:
        return None
    return f, ptr - f.base


def _memory(t: torch.Tensor) -> memoryview:
    """The bytes of contiguous ``t`` (which must outlive the view)."""
    return memoryview((ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())).cast("B")


def _pread(f: _File, dsts: list[torch.Tensor], offset: int) -> None:
    """Fill contiguous ``dsts`` in turn with the file's bytes from ``offset`` on (one ``preadv`` for all)."""
    views = [_memory(t) for t in dsts]
    n, done = sum(len(v) for v in views), 0
    while views:  # one call reads at most 2 GiB on Linux
        got = os.preadv(f.fd, views, offset + done)
        if got <= 0:
            raise OSError(f"{f.path}: ended at byte {offset + done}, {n - done} bytes short of a tensor")
        done += got
        while views and got >= len(views[0]):
            got -= len(views.pop(0))
        if got:
            views[0] = views[0][got:]


def copy(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)``, reading a ``src`` mapped from a tracked file with ``pread`` (see the module). Inside
    ``Reads`` whose memory holds ``dst``, the read is queued: ``dst`` is filled by the end of that block."""
    found = _find(src)
    if found is None or dst.device.type != "cpu" or dst.shape != src.shape:
        return dst.copy_(src)
    f, offset = found
    whole = dst.dtype == src.dtype and dst.is_contiguous() and src.is_contiguous()
    if not whole and _span(src) > _SPAN * src.numel():
        return dst.copy_(src)
    reads: Optional[Reads] = getattr(_ACTIVE, "reads", None)
    if reads is not None and reads.holds(dst):
        reads.queue(f, offset, dst, None if whole else src)
    elif whole:
        _pread(f, [dst], offset)
    else:
        _read_strided(f, offset, dst, src)
    return dst


def _read_strided(f: _File, offset: int, dst: torch.Tensor, src: torch.Tensor) -> None:
    """``copy`` of a strided ``src`` (at ``offset`` in ``f``) or into a strided ``dst``: rows straight into
    their places where both are rows of one dtype (``_scatter``), else through a buffer (``_read_rows``)."""
    if _LIBC_PREADV is not None and dst.dtype == src.dtype and _rows(dst) and _rows(src):
        _scatter(f, offset, dst, src)
    else:
        _read_rows(f, offset, dst, src)


def _rows(t: torch.Tensor) -> bool:
    """Whether ``t`` is rows (its first dimension) of at least ``_ROW_MIN`` bytes, each contiguous, in order
    and apart in memory."""
    return (t.dim() >= 2 and t[0].is_contiguous() and t[0].numel() * t.element_size() >= _ROW_MIN
            and t.stride(0) >= t[0].numel())


def _scatter(f: _File, offset: int, dst: torch.Tensor, src: torch.Tensor) -> None:
    """Read rows ``src`` of the file into rows ``dst`` with ``preadv``, a buffer per row in its place in
    ``dst`` and, between rows, the bytes of the file that ``src`` skips into one scratch buffer: no copy
    after the read. A column piece of a weight (a tensor-parallel slice, or where such slices join) is such
    rows; through a buffer, its bytes crossed memory twice more. The list of buffers is built as a tensor
    (addresses and lengths, ``struct iovec``), not as a Python object per row."""
    rows, size = dst.shape[0], dst[0].numel() * dst.element_size()
    step, gap = dst.stride(0) * dst.element_size(), (src.stride(0) - src[0].numel()) * src.element_size()
    scratch = torch.empty(gap, dtype=torch.uint8)
    per = _IOV_MAX // 2 if gap else _IOV_MAX
    for first in range(0, rows, per):
        n = min(per, rows - first)
        iov = torch.empty((n, 2 if gap else 1, 2), dtype=torch.int64)
        iov[:, 0, 0] = torch.arange(first, first + n, dtype=torch.int64) * step + dst.data_ptr()
        iov[:, 0, 1] = size
        if gap:
            iov[:, 1, 0], iov[:, 1, 1] = scratch.data_ptr(), gap
        _preadv_iov(f, iov.view(-1, 2)[:-1] if gap else iov.view(-1, 2), offset + first * (size + gap))


def _preadv_iov(f: _File, iov: torch.Tensor, offset: int) -> None:
    """``preadv`` from ``offset`` into the buffers ``iov`` lists (rows of address, length), going on after a
    short read from where it stopped."""
    while iov.shape[0]:
        got = _LIBC_PREADV(f.fd, iov.data_ptr(), iov.shape[0], offset)
        if got < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:  # a signal came first: retried, as ``os.preadv`` does
                continue
            raise OSError(err, f"{f.path}: {os.strerror(err)}")
        if got == 0:
            raise OSError(f"{f.path}: ended at byte {offset}, {int(iov[:, 1].sum())} bytes short of a tensor")
        offset += got
        ends = iov[:, 1].cumsum(0)
        done = int(torch.searchsorted(ends, got, right=True))  # buffers filled whole
        if done < iov.shape[0]:
            part = got - (int(ends[done - 1]) if done else 0)  # bytes already in the next one
            iov = iov[done:].clone()
            iov[0, 0] += part
            iov[0, 1] -= part
        else:
            return


def _read_rows(f: _File, offset: int, dst: torch.Tensor, src: torch.Tensor) -> None:
    """``copy`` of a strided ``src`` (at ``offset`` in ``f``) into ``dst`` where ``_scatter`` does not apply
    (another dtype, a layout that is not rows, rows under ``_ROW_MIN``): through a small buffer laid out like
    the file, a block of rows at a time, not a buffer of the piece's size (joining a 256 MiB piece of
    columns added 2 MiB to the peak resident set instead of 258 MiB, in the same time)."""
    span = _span(src)
    outer = src.dim() > 1 and src.stride(0) == max(src.stride()) > 0
    rows, row = (src.shape[0], src.stride(0)) if outer else (1, span)
    per = max(1, _BLOCK // (row * src.element_size()))
    buffer = empty_to_fill((min(span, per * row),), src.dtype)
    for first in range(0, rows, per):
        block = src.narrow(0, first, min(per, rows - first)) if outer else src
        part = buffer[:_span(block)]
        _pread(f, [part], offset + first * row * src.element_size())
        (dst.narrow(0, first, block.shape[0]) if outer else dst).copy_(part.as_strided(block.shape, block.stride()))


_ACTIVE = threading.local()


class Reads:
    """Copies out of mapped files into ``into`` (memory nothing reads until the block ends), queued and run by
    ``workers`` threads while the caller goes on cutting the next tensors; the block's end waits for them.

    A resharded load is a string of reads with CPU work between (each tensor's pieces found, cut, joined):
    read one at a time, the disk idled during the CPU work, and a cold tp=2 × pp=2 → dp=2 load took 1.2× as
    long as reading every file once; queued, 0.98× (BENCHMARKS.md). Reads that follow each other in a file
    become one ``preadv`` and the queue is handed over in batches of ``batch`` bytes: a thread hand-off
    per small read cost more than the read. Only copies whose destination lies in ``into`` are queued, so a
    tensor read to be used at once (``read``) is whole when its copy returns."""

    def __init__(self, into: list[torch.Tensor], workers: int = 2, batch: int = 4 << 20):
        spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in into)
        self._starts, self._ends = [a for a, _ in spans], [b for _, b in spans]  # asked once per copy: bisected
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="checkpoint-read")
        self._batch_bytes = batch
        self._batch: list[list] = []  # [file, offset, end offset, [dst...], src or None], in order
        self._queued = 0  # bytes in the batch
        self._submitted: list[Future] = []
        self._waited = 0  # how many of them were waited for

    def holds(self, t: torch.Tensor) -> bool:
        """Whether all of ``t``'s memory lies in the block's: then a copy into it may be queued."""
        start = t.data_ptr()
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and start + _span(t) * t.element_size() <= self._ends[i]

    def queue(self, f: _File, offset: int, dst: torch.Tensor, src: Optional[torch.Tensor]) -> None:
        """Queue ``copy``'s read of ``src`` (None: ``dst`` takes the file's bytes as they are)."""
        n = dst.numel() * dst.element_size()
        last = self._batch[-1] if self._batch else None
        if (src is None and last is not None and last[0] is f and last[2] == offset and last[4] is None
                and len(last[3]) < _IOV_MAX):
            last[2] += n
            last[3].append(dst)
        else:  # ``src`` is held: it keeps the file mapped and open
            self._batch.append([f, offset, offset + n, [dst], src])
        self._queued += n
        if self._queued >= self._batch_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._batch:
            self._submitted.append(self._pool.submit(_run, self._batch))
            self._batch, self._queued = [], 0

    def submitted(self) -> int:
        """How many batches were handed over, this one included: ``wait``'s argument to wait for those."""
        self._flush()
        return len(self._submitted)

    def wait(self, first: Optional[int] = None) -> None:
        """Wait for the ``first`` batches (all by default); raises the first failed read's error."""
        self._flush()
        done = self._submitted[self._waited:first]
        self._waited += len(done)
        try:
            for future in done:
                future.result()
        finally:
            concurrent.futures.wait(done)  # all finished, failed or not, before an error leaves

    def __enter__(self) -> "Reads":
        if getattr(_ACTIVE, "reads", None) is not None:
            raise RuntimeError("mapped.Reads blocks do not nest")
        _ACTIVE.reads = self
        return self

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.reads = None
        if exc[0] is not None:
            self._batch = []  # not read: the caller is failing
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def _run(batch: list[list]) -> None:
    """A worker's part: one batch of ``Reads.queue``'s reads, in order."""
    for f, offset, _, dsts, src in batch:
        if src is None:
            _pread(f, dsts, offset)
        else:
            _read_strided(f, offset, dsts[0], src)


def read(t: torch.Tensor) -> torch.Tensor:
    """``t`` in memory of its own when it is mapped from a tracked file (read with ``pread``), else ``t``."""
    if _find(t) is None:
        return t
    return copy(empty_to_fill(t.shape, t.dtype), t)

