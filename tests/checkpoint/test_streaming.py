"""The converter streams: each logical tensor is read once, and at most one model unit is alive at a time."""

from __future__ import annotations

import weakref

import pytest
import torch

from adapter.checkpoint.convert import open_checkpoint, target_layout
from adapter.checkpoint.convert import write_streaming
from adapter.config import RawConfig, normalize
from adapter.model.mapping import logical_keys, model_units
from tests.checkpoint.test_bridge import tiny_model, write_internevo
from tests.conftest import base_sections
from tests.model.workers import random_logical


class Tracked(dict):
    """A logical source that hands out fresh copies and watches how many are alive at once."""

    def __init__(self, logical: dict):
        super().__init__(logical)
        self.reads: list[str] = []
        self.alive: dict[int, int] = {}
        self.peak = 0

    def __getitem__(self, key: str) -> torch.Tensor:
        self.reads.append(key)
        value = super().__getitem__(key).clone()
        self.alive[id(value)] = value.numel() * value.element_size()
        self.peak = max(self.peak, sum(self.alive.values()))
        weakref.finalize(value, self.alive.pop, id(value), None)
        return value

    def meta(self, key: str) -> torch.Tensor:
        return super().__getitem__(key).to("meta")


@pytest.mark.parametrize("fmt,tp,pp,vpp", [("internevo", 2, 2, 1), ("internevo", 1, 3, 2),
                                           ("mcore-legacy", 4, 2, 2), ("hf", 1, 1, 1), ("mcore", 1, 1, 1)])
def test_each_tensor_read_once_and_one_unit_alive(tmp_path, fmt, tp, pp, vpp):
    model = tiny_model("internlm1")
    logical = random_logical(model, 21)
    source = Tracked(logical)
    layout = None if fmt in ("hf", "mcore") else target_layout(model, tp, pp, vpp)
    (tmp_path / "out").mkdir()
    write_streaming(source, model, fmt, layout, tmp_path / "out", shard_bytes=100_000)
    assert sorted(source.reads) == sorted(logical_keys(model))  # every tensor, once
    unit_bytes = max(sum(logical[k].numel() * logical[k].element_size() for k in keys) for keys in model_units(model))
    assert source.peak <= unit_bytes  # never more than one unit of source tensors alive
    assert source.peak < sum(t.numel() * t.element_size() for t in logical.values()) / 3
    if fmt != "hf":
        back = open_checkpoint(tmp_path / "out", model)
        assert all(torch.equal(back.tensors[k], logical[k]) for k in logical)


def test_internevo_source_pages_are_released(tmp_path):
    """Reading a memory-mapped InternEvo folder tensor by tensor leaves no source pages resident."""
    psutil = pytest.importorskip("psutil")
    sections = base_sections()
    sections["model"].update(num_layers=2, hidden_size=512, num_attention_heads=8, vocab_size=8192)
    model = normalize(RawConfig(sections, "m.py", {})).model
    folder = write_internevo(tmp_path / "src", random_logical(model, 5), model, 2, 2, 1)
    src = open_checkpoint(folder)
    proc = psutil.Process()

    def mapped_rss() -> int:  # resident bytes of this process that belong to the source files
        return sum(m.rss for m in proc.memory_maps(grouped=True) if m.path.startswith(str(folder)))

    total = sum(f.stat().st_size for f in folder.glob("model_tp*.pt"))
    for key in src.tensors:
        value = src.tensors[key]
        del value
        assert mapped_rss() < total / 50, key  # boundary pages and zip headers only
    # the measurement sees mapped pages: touching a mapped tensor without releasing it shows up
    from adapter.checkpoint.io.safe_load import load_tensors

    mapped = load_tensors(folder / "model_tp0_pp0.pt")
    for t in mapped.values():
        t.sum()  # reads every page of the file
    assert mapped_rss() > total / 5


def test_hf_source_is_read_layer_by_layer_once(tmp_path, monkeypatch):
    """An HF folder converts to InternEvo reading each safetensors tensor once, with plain file reads."""
    from adapter.checkpoint.convert import write_checkpoint
    from adapter.checkpoint.formats.hf import HFTensors

    model = tiny_model("internlm2")
    logical = random_logical(model, 22)
    (tmp_path / "hf").mkdir()
    write_streaming(logical, model, "hf", None, tmp_path / "hf", shard_bytes=100_000)
    reads: list[str] = []
    original = HFTensors._read
    monkeypatch.setattr(HFTensors, "_read", lambda self, key: reads.append(key) or original(self, key))
    src = open_checkpoint(tmp_path / "hf")
    assert reads == []  # opening reads headers only
    write_checkpoint(src, "internevo", tmp_path / "ie", target_layout(model, 2, 2, 2))
    assert sorted(reads) == sorted(src.tensors.entries)  # every HF tensor, once
    back = open_checkpoint(tmp_path / "ie")
    assert all(torch.equal(back.tensors[k], logical[k]) for k in logical)


def test_truncated_safetensors_is_named(tmp_path):
    from adapter.checkpoint.errors import CheckpointError

    model = tiny_model("internlm1")
    (tmp_path / "hf").mkdir()
    write_streaming(random_logical(model, 23), model, "hf", None, tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot be read as safetensors .*ends past the end"):
        open_checkpoint(tmp_path / "hf")


def test_megatron_legacy_source_is_read_one_unit_at_a_time(tmp_path):
    from adapter.checkpoint.errors import CheckpointError

    model = tiny_model("internlm2")
    logical = random_logical(model, 24)
    layout = target_layout(model, 2, 3, 2)
    (tmp_path / "mc").mkdir()
    write_streaming(logical, model, "mcore-legacy", layout, tmp_path / "mc")
    (tmp_path / "mc" / "latest_checkpointed_iteration.txt").write_text("0\n")
    src = open_checkpoint(tmp_path / "mc", model)
    assert (src.layout.tp, src.layout.pp, src.layout.vpp) == (2, 3, 2)
    assert src.tensors.cache == {}  # opening reads nothing
    largest = max(len(keys) for keys in model_units(model))
    for key in logical_keys(model):
        assert torch.equal(src.tensors[key], logical[key]), key
        assert len(src.tensors.cache) <= largest  # one unit's tensors, never more
    victim = tmp_path / "mc" / "iter_0000000" / "mp_rank_01_002" / "model_optim_rng.pt"
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="mp_rank_01_002/model_optim_rng.pt: cannot be read"):
        open_checkpoint(tmp_path / "mc", model)
