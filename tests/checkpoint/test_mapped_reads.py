"""Copies out of memory-mapped checkpoint files read the file (``pread``), give ``torch.load``'s values, and
never read another file than the one mapped."""

from __future__ import annotations

import ctypes
import gc
import os

import pytest
import torch

from adapter.checkpoint.io import mapped
from adapter.checkpoint.io.safe_load import load_tensors
from adapter.weights.stored import concat

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux only")


def _mapping_rss(t: torch.Tensor) -> int:
    """Resident bytes of the mapping holding ``t`` (its line in ``/proc/self/smaps``)."""
    ptr, inside = t.data_ptr(), False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= ptr < end
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("no mapping holds the tensor")


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    values = {"w": torch.randn(256, 384), "b": torch.randn(4096).bfloat16(), "n": torch.randn(8, 3)}
    path = tmp_path / "model_tp0_pp0.pt"
    torch.save(values, path)
    return path, values


def test_views_are_read_from_the_file_with_torch_load_values(saved):
    path, values = saved
    expected = torch.load(path, weights_only=True)  # read whole, no mapping
    loaded = load_tensors(path)
    w, b = loaded["w"], loaded["b"]
    views = [w, w[10:100], w[:, 64:300], w.t(), b[100:3000], loaded["n"]]
    wanted = [expected["w"], expected["w"][10:100], expected["w"][:, 64:300], expected["w"].t(),
              expected["b"][100:3000], expected["n"]]
    for view, want in zip(views, wanted):
        got = mapped.copy(torch.empty_like(view), view)
        assert torch.equal(got, want)
        as_double = mapped.copy(torch.empty(view.shape, dtype=torch.float64), view)
        assert torch.equal(as_double, want.double())
    assert torch.equal(mapped.read(w[:, 64:300]), expected["w"][:, 64:300])
    assert mapped.read(w[:, 64:300]).is_contiguous()
    # every copy above went through the file, not the mapping
    assert _mapping_rss(w) == 0, "the mapping's pages were faulted in"
    # one column spans the whole matrix: it is copied from the mapping (faulting its pages in, as the check sees)
    assert torch.equal(mapped.read(w[:, 5]), expected["w"][:, 5])
    assert _mapping_rss(w) >= w.numel() * 4


def test_joins_of_mapped_pieces_are_torch_cat(tmp_path):
    torch.manual_seed(1)
    pieces = [torch.randn(64, 48), torch.randn(64, 48)]
    for r, p in enumerate(pieces):
        torch.save({"w": p}, tmp_path / f"model_tp{r}_pp0.pt")
    files = [load_tensors(tmp_path / f"model_tp{r}_pp0.pt")["w"] for r in range(2)]
    for dim in (0, 1):
        assert torch.equal(concat(files, dim), torch.cat(pieces, dim))
        out = torch.full((128, 48) if dim == 0 else (64, 96), float("nan"))
        assert concat(files, dim, out=out) is out and torch.equal(out, torch.cat(pieces, dim))
    with pytest.raises(ValueError, match=r"shape \(100, 48\)"):
        concat(files, 0, out=torch.empty(100, 48))


def test_queued_reads_fill_their_memory_by_the_block_end(saved, monkeypatch):
    """Inside ``Reads``, copies into its memory are queued and done by the block's end, with ``torch.load``'s
    values: pieces that follow each other in the file in one ``preadv`` whatever their places in memory,
    strided and other-dtype pieces through a buffer. A copy into other memory is done when it returns."""
    path, _ = saved
    expected = torch.load(path, weights_only=True)
    loaded = load_tensors(path)
    w, b = loaded["w"], loaded["b"]
    calls: list[int] = []
    preadv = os.preadv
    monkeypatch.setattr(mapped.os, "preadv", lambda fd, views, at: calls.append(len(views)) or preadv(fd, views, at))
    into = torch.full((2 * 256 * 384 + 3000,), float("nan"))
    rows = into[:256 * 384].view(256, 384)
    columns = into[256 * 384:2 * 256 * 384].view(256, 384)[:, :236]
    outside = torch.empty(90, 384)
    with mapped.Reads([into], batch=1 << 40) as reads:
        for first in (0, 64, 128, 192):  # the file's rows in order, into memory in another order
            mapped.copy(rows[(first + 128) % 256:][:64], w[first:first + 64])
        mapped.copy(columns, w[:, 64:300])
        mapped.copy(into[-3000:-100], b[100:3000])
        assert calls == []  # queued
        mapped.copy(outside, w[10:100])
        assert calls == [1] and torch.equal(outside, expected["w"][10:100])
    assert calls[1] == 4, "four consecutive pieces of the file: one preadv"
    assert torch.equal(rows, expected["w"].roll(128, 0))
    assert torch.equal(columns, expected["w"][:, 64:300])
    assert torch.equal(into[-3000:-100], expected["b"][100:3000].float())
    assert reads.submitted() == 1
    assert _mapping_rss(w) == 0, "the mapping's pages were faulted in"


def test_reads_cut_short_go_on_where_they_stopped(saved, monkeypatch):
    """``preadv`` may read less than asked (Linux: at most 2 GiB a call): the read goes on from there, into
    the same buffer or the next."""
    path, _ = saved
    expected = torch.load(path, weights_only=True)
    w = load_tensors(path)["w"]
    preadv = os.preadv

    def at_most_1000_bytes(fd, views, at):
        kept, room = [], 1000
        for view in views:
            if room:
                kept.append(view[:room])
                room -= len(kept[-1])
        return preadv(fd, kept, at)

    monkeypatch.setattr(mapped.os, "preadv", at_most_1000_bytes)
    into = torch.empty(256, 384)
    with mapped.Reads([into]):
        for first in range(0, 256, 7):  # rows of 1536 bytes: cuts inside one buffer and across two
            mapped.copy(into[first:first + 7], w[first:first + 7])
    assert torch.equal(into, expected["w"])


def test_a_failed_queued_read_fails_the_block(saved):
    path, _ = saved
    w = load_tensors(path)["w"]
    into = torch.empty(w.shape)
    with pytest.raises(OSError, match=f"{path}: ended at byte .* short of a tensor"):
        with mapped.Reads([into]):
            os.truncate(path, 1000)  # the file loses its bytes after they were mapped
            mapped.copy(into, w)


def test_a_file_replaced_after_loading_is_not_read(saved):
    """The reader keeps its own descriptor of the file it mapped: a checkpoint saved again under the same
    name (an atomic rename) does not change what the loaded tensors read."""
    path, values = saved
    loaded = load_tensors(path)
    other = {k: v + 1 for k, v in values.items()}
    torch.save(other, path.with_suffix(".new"))
    os.replace(path.with_suffix(".new"), path)
    assert torch.equal(mapped.copy(torch.empty(256, 384), loaded["w"]), values["w"])
    assert torch.equal(mapped.read(loaded["b"][7:99]), values["b"][7:99])


def test_the_file_is_let_go_with_its_tensors(saved):
    path, _ = saved
    gc.collect()  # the other tests' files
    before = len(os.listdir("/proc/self/fd"))
    loaded = load_tensors(path)
    view = loaded["w"][3:9]
    assert len(os.listdir("/proc/self/fd")) == before + 1
    del loaded
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before + 1  # a view holds its base tensor, and so the record
    assert torch.equal(mapped.read(view), torch.load(path, weights_only=True)["w"][3:9])
    del view
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before


def test_loaded_tensors_save_as_plain_tensors(saved, tmp_path):
    """Tracking attaches nothing to the tensors: saved again, they load with ``weights_only``."""
    path, values = saved
    loaded = load_tensors(path)
    torch.save({"w": loaded["w"], "row": loaded["w"][3]}, tmp_path / "again.pt")
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    assert torch.equal(again["w"], values["w"]) and torch.equal(again["row"], values["w"][3])


def test_without_a_descriptor_to_spare_copies_come_from_the_mapping(saved, monkeypatch):
    """A process out of file descriptors (a conversion keeps its source files open) still loads and copies:
    the file is not tracked and its tensors are copied from the mapping."""
    path, values = saved

    def no_descriptor(*args, **kwargs):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(mapped.os, "open", no_descriptor)
    loaded = load_tensors(path)
    monkeypatch.undo()
    got = mapped.copy(torch.empty(256, 236), loaded["w"][:, 64:300])
    assert _mapping_rss(loaded["w"]) > 0  # read through the mapping
    assert torch.equal(got, values["w"][:, 64:300])


def test_a_sibling_file_is_opened_with_its_own_bytes_and_torch_load_values(tmp_path):
    """``load_tensors_like``: a file of the same structure gives what ``torch.load`` gives (its own values,
    views sharing a storage included), read through ``mapped`` as a loaded file is; any difference in
    structure gives None."""
    from adapter.checkpoint.io.safe_load import load_tensors_like

    def content(seed: int, rows: int = 64) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(rows, 48, generator=g)
        return {"w": w, "w_tail": w[10:], "b": torch.randn(7, generator=g).bfloat16(), "i": torch.arange(5) + seed}

    # one file name in four folders, as in a checkpoint's state folders (torch.save names records after the file)
    first, second, other, bigger = (tmp_path / n / "model_tp0_pp0.pt" for n in ("first", "second", "other", "bigger"))
    for path in (first, second, other, bigger):
        path.parent.mkdir()
    torch.save(content(0), first)
    torch.save(content(1), second)
    torch.save(content(1, rows=64) | {"extra": torch.zeros(1)}, other)
    torch.save(content(1, rows=65), bigger)
    like = load_tensors(first)

    loaded = load_tensors_like(second, first, like)
    expected = torch.load(second, weights_only=True)
    assert torch.equal(mapped.read(loaded["w"][:, 5:40]), expected["w"][:, 5:40])
    assert _mapping_rss(loaded["w"]) == 0  # read with pread: tracked like any loaded file
    assert list(loaded) == list(expected)
    for key, want in expected.items():
        got = loaded[key]
        assert (got.dtype, got.shape, got.stride(), got.storage_offset()) == \
            (want.dtype, want.shape, want.stride(), want.storage_offset()), key
        assert torch.equal(got, want), key
        assert not torch.equal(got.float(), like[key].float()), key  # this file's bytes, not the sibling's
    assert load_tensors_like(other, first, like) is None  # another key: another pickle
    assert load_tensors_like(bigger, first, like) is None  # another shape


@pytest.fixture
def tall(tmp_path):
    """A file with a matrix of more rows than one ``preadv`` takes buffers (Linux's ``IOV_MAX``, 1024), rows
    of 1200 bytes."""
    torch.manual_seed(2)
    path = tmp_path / "model_tp0_pp0.pt"
    torch.save({"m": torch.randn(2500, 300)}, path)
    return path, torch.load(path, weights_only=True)["m"]


def test_rows_are_read_straight_into_their_places(tall, monkeypatch):
    """Rows of one dtype (a column piece, or a piece joined into columns) are read by ``preadv`` into their
    places, the file's bytes between them into scratch: no buffer copied afterwards; ``torch.load``'s values.
    Rows under 1 KiB go through the buffer."""
    path, expected = tall
    m = load_tensors(path)["m"]
    buffered = []
    read_rows = mapped._read_rows
    monkeypatch.setattr(mapped, "_read_rows", lambda *a: buffered.append(a[2].shape) or read_rows(*a))
    real, asked = mapped._LIBC_PREADV, []

    def counted(fd, iov_address, count, offset):
        iov = torch.frombuffer((ctypes.c_int64 * (2 * count)).from_address(iov_address), dtype=torch.int64)
        asked.append(int(iov[1::2].sum()))
        return real(fd, iov_address, count, offset)

    monkeypatch.setattr(mapped, "_LIBC_PREADV", counted)
    columns = mapped.copy(torch.empty(2500, 256), m[:, 20:276])  # from a strided piece of the file
    assert torch.equal(columns, expected[:, 20:276])
    # 512 rows (and the 511 gaps between them) a call, as IOV_MAX allows: the rows, and the gaps inside a call
    assert len(asked) == 5 and sum(asked) == 2500 * 1024 + (2500 - 5) * 44 * 4
    joined = torch.full((2500, 320), float("nan"))
    mapped.copy(joined[:, 10:310], m)  # into a strided place
    assert torch.equal(joined[:, 10:310], expected) and joined[:, :10].isnan().all() and joined[:, 310:].isnan().all()
    assert len(asked) == 5 + 3 and sum(asked[5:]) == 2500 * 1200  # 1024 rows a call: no gaps
    both = torch.full((2500, 260), float("nan"))
    mapped.copy(both[:, 2:258], m[:, 20:276])
    assert torch.equal(both[:, 2:258], expected[:, 20:276])
    assert both[:, :2].isnan().all() and both[:, 258:].isnan().all()
    assert buffered == [] and _mapping_rss(m) == 0, "through a buffer, or the mapping's pages faulted in"
    short = mapped.copy(torch.empty(2500, 200), m[:, 50:250])  # rows of 800 bytes
    assert torch.equal(short, expected[:, 50:250]) and buffered == [(2500, 200)] and len(asked) == 8 + 5


def test_row_reads_cut_short_go_on_where_they_stopped(tall, monkeypatch):
    """A short ``preadv`` of rows goes on from where it stopped, inside a row's buffer or at the next."""
    path, expected = tall
    m = load_tensors(path)["m"]
    real = mapped._LIBC_PREADV

    def at_most_1000_bytes(fd, iov_address, count, offset):
        iov = torch.frombuffer((ctypes.c_int64 * (2 * count)).from_address(iov_address), dtype=torch.int64)
        kept, room = 0, 1000
        while kept < count and room > 0:
            room -= int(iov[2 * kept + 1])
            kept += 1
        if room < 0:  # the last buffer taken is cut short: a copy of the list with its length cut
            cut = iov[:2 * kept].clone()
            cut[-1] += room
            return real(fd, cut.data_ptr(), kept, offset)
        return real(fd, iov_address, kept, offset)

    monkeypatch.setattr(mapped, "_LIBC_PREADV", at_most_1000_bytes)
    joined = torch.empty(2500, 320)
    mapped.copy(joined[:, 10:310], m)  # rows of 1200 bytes: cut inside each
    assert torch.equal(joined[:, 10:310], expected)
    columns = mapped.copy(torch.empty(2500, 256), m[:, 20:276])  # rows of 1024, and the 176 between
    assert torch.equal(columns, expected[:, 20:276])


def test_a_failed_row_read_names_the_file(tall):
    path, _ = tall
    m = load_tensors(path)["m"]
    os.truncate(path, 4096)  # the file loses its bytes after they were mapped
    with pytest.raises(OSError, match=f"{path}: ended at byte .* short of a tensor"):
        mapped.copy(torch.empty(2500, 256), m[:, 20:276])
