"""The tensor-by-tensor writers against the libraries' own writers and readers."""

from __future__ import annotations

import re
import zipfile
from collections import OrderedDict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from adapter.checkpoint.io import shared_write
from adapter.checkpoint.io.stream_write import SafetensorsWriter, TorchFileWriter, leaves


def _sample() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "iteration": 3, "checkpoint_version": 3.0,
        "model0": OrderedDict(a=torch.randn(3, 4, generator=g).bfloat16(), b=torch.randn(5, generator=g)),
        "model1": OrderedDict(c=torch.randn(2, 2, generator=g).half(), scalar=torch.tensor(1.5),
                              ids=torch.arange(4)),
    }


def _skeleton(obj):
    if isinstance(obj, torch.Tensor):
        return torch.empty(obj.shape, dtype=obj.dtype, device="meta")
    if isinstance(obj, dict):
        return type(obj)((k, _skeleton(v)) for k, v in obj.items())
    return obj


def test_torch_file_matches_torch_save(tmp_path):
    obj = _sample()
    torch.save(obj, tmp_path / "ref.pt")
    writer = TorchFileWriter(tmp_path / "mine.pt", _skeleton(obj))
    for _, t in leaves(obj):
        writer.write(t)
    writer.close()
    ref, mine = zipfile.ZipFile(tmp_path / "ref.pt"), zipfile.ZipFile(tmp_path / "mine.pt")
    assert [n.split("/", 1)[1] for n in mine.namelist()] == [n.split("/", 1)[1] for n in ref.namelist()]
    assert mine.read("mine/data.pkl") == ref.read("ref/data.pkl")  # torch.save's pickle, byte for byte
    assert mine.testzip() is None  # every CRC checks out
    for mmap in (False, True):
        back = torch.load(tmp_path / "mine.pt", weights_only=True, mmap=mmap)
        assert back["iteration"] == 3 and back["checkpoint_version"] == 3.0
        for name in ("model0", "model1"):
            assert isinstance(back[name], OrderedDict) and list(back[name]) == list(obj[name])
            for key, value in obj[name].items():
                assert back[name][key].dtype == value.dtype and torch.equal(back[name][key], value)


def test_file_written_in_parts_is_torch_save_byte_for_byte(tmp_path):
    """Reserved by one writer, its tensors written by two others in any order (one from a view that is not
    contiguous, one in row blocks by both, one block cut from a wider matrix's columns), sealed: the very bytes ``torch.save`` writes, CRCs and serialization id included;
    again with the same skeleton and name, when ``reserve`` writes what it kept of the first file instead
    of running torch's writer."""
    g = torch.Generator().manual_seed(1)
    obj = OrderedDict(w=torch.randn(3000, 70, generator=g), b=torch.randn(9, generator=g).bfloat16(),
                      empty=torch.zeros(0), t=torch.randn(11, 7, generator=g).t().contiguous(),
                      ids=torch.arange(5))
    torch.save(obj, tmp_path / "ref.pt")
    tensors = [t for _, t in leaves(obj)]
    sizes = [t.numel() * t.element_size() for t in tensors]
    row, kept = 70 * 4, None
    for again in (False, True):
        path = tmp_path / f"sub{int(again)}" / "ref.pt"  # the archive name inside is the file's stem
        path.parent.mkdir()
        reserved = shared_write.reserve(path, _skeleton(obj))
        assert not again or reserved is kept
        places = reserved.places
        first = shared_write.write_records(path, places, [(3, 0, obj["t"].t().contiguous().t()),
                                                           (0, 2000 * row, tensors[0][2000:])])
        wide = torch.cat([tensors[0], torch.zeros(3000, 5)], dim=1)  # rows 120:2000 from its columns
        second = shared_write.write_records(path, places, [(4, 0, tensors[4]), (1, 0, tensors[1]), (2, 0, tensors[2]),
                                                            (0, 0, tensors[0][:120]), (0, 120 * row, wide[120:2000, :70])])
        assert first[0].crc != 0 and zipfile.ZipFile(path).getinfo("ref/data/3").CRC == 0  # not sealed yet
        crcs = {i: shared_write.whole_crc([p for p in first + second if p.index == i], sizes[i]) for i in range(5)}
        shared_write.seal(path, crcs, reserved)
        assert path.read_bytes() == (tmp_path / "ref.pt").read_bytes()
        kept = reserved
    with pytest.raises(ValueError, match="CRCs of tensors"):
        shared_write.seal(path, {i: crcs[i] for i in (0, 1)}, reserved)
    with pytest.raises(ValueError, match=rf"bytes \[\(0, {120 * row}\), \({2000 * row}, {3000 * row}\)\] of"):
        shared_write.whole_crc([p for p in first + second if p.index == 0 and p.offset != 120 * row], sizes[0])
    with pytest.raises(ValueError, match=rf"\({2000 * row}, {3000 * row}\), \({2000 * row}, {3000 * row}\)\]"):  # twice
        shared_write.whole_crc([p for p in first + second + first if p.index == 0], sizes[0])


def test_views_are_written_as_their_own_bytes(tmp_path):
    """A row slice (storage offset > 0) and a column slice (not contiguous) each write only their values."""
    base = torch.arange(24.0).reshape(4, 6)
    parts = OrderedDict(rows=base[2:], cols=base[:, 1:3])
    writer = TorchFileWriter(tmp_path / "v.pt", _skeleton(parts))
    for t in parts.values():
        writer.write(t)
    writer.close()
    back = torch.load(tmp_path / "v.pt", weights_only=True)
    assert torch.equal(back["rows"], base[2:]) and torch.equal(back["cols"], base[:, 1:3])


def test_writers_refuse_wrong_order_shape_and_missing_tensors(tmp_path):
    skeleton = OrderedDict(a=torch.empty(2, 3, device="meta"), b=torch.empty(4, device="meta"))
    for make in (lambda p: TorchFileWriter(p, skeleton), lambda p: SafetensorsWriter(p, skeleton)):
        writer = make(tmp_path / "x")
        with pytest.raises(ValueError, match=r"tensor a has shape \(3, 2\)"):
            writer.write(torch.zeros(3, 2))
        with pytest.raises(ValueError, match=r"#1 given while #0 \(a\) is due"):
            writer.write(torch.zeros(4), position=1)
        writer.write(torch.zeros(2, 3), position=0)
        with pytest.raises(ValueError, match=r"closed before every tensor was written \(next: b\)"):
            writer.close()
        writer.write(torch.zeros(4))
        with pytest.raises(ValueError, match="more tensors than announced"):
            writer.write(torch.zeros(4))
        writer.close()


def test_safetensors_file_reads_back_with_safetensors(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = OrderedDict(w=torch.randn(5, 3, generator=g).bfloat16(), b=torch.randn(7, generator=g),
                          h=torch.randn(1, 1, generator=g).half())
    writer = SafetensorsWriter(tmp_path / "m.safetensors", _skeleton(tensors), {"format": "pt"})
    for t in tensors.values():
        writer.write(t)
    writer.close()
    back = load_file(tmp_path / "m.safetensors")
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_private_torch_apis_are_version_checked():
    """The writers lean on torch's private zip writer; a torch outside the checked range is refused by name."""
    from adapter.checkpoint.io.torch_private import check_version

    check_version()  # the installed torch is in range
    for version in ("2.5.1", "2.14.0+cu128", "3.0.0"):
        with pytest.raises(RuntimeError, match=re.escape(f"torch {version}: the checkpoint writers")):
            check_version(version)
