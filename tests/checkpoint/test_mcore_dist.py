"""megatron-core's ``torch_dist`` format, written and read without megatron: round trips, streaming reads,
damaged and hostile folders. (Megatron's own loader and saver are the oracle in ``test_bridge``.)"""

from __future__ import annotations

import dataclasses
import os
import pickle

import pytest
import torch

from adapter.checkpoint.convert import compare, open_checkpoint, target_layout, write_checkpoint
from adapter.checkpoint.formats.mcore import DATA_FILE, METADATA, DistTensors
from adapter.checkpoint.errors import CheckpointError
from adapter.checkpoint.io.safe_load import load_dcp_metadata
from adapter.model.mapping import logical_keys, model_units
from tests.checkpoint.test_bridge import tiny_model, write_internevo
from tests.model.workers import random_logical


@pytest.mark.parametrize("family", ["internlm1", "internlm2"])
def test_internevo_torch_dist_hf_internevo_is_bit_exact(tmp_path, family):
    model = tiny_model(family)
    src = open_checkpoint(write_internevo(tmp_path / "src", random_logical(model, 31), model, 4, 2, 2))
    dist = open_checkpoint(write_checkpoint(src, "mcore", tmp_path / "dist", None))
    assert dist.format == "mcore" and dist.model == src.model
    hf = open_checkpoint(write_checkpoint(dist, "hf", tmp_path / "hf", None))
    back = open_checkpoint(write_checkpoint(hf, "internevo", tmp_path / "ie", target_layout(model, 4, 2, 2)))
    assert compare(back, src) == [] and compare(dist, src) == []
    for name in ("model_tp0_pp0.pt", "model_tp3_pp1.pt"):  # the files themselves, key order included
        a, b = torch.load(src.path / name, weights_only=True), torch.load(back.path / name, weights_only=True)
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_cast_is_recorded(tmp_path):
    model = tiny_model("internlm2")
    logical = random_logical(model, 32)
    src = open_checkpoint(write_internevo(tmp_path / "src", logical, model, 2, 1, 1))
    dist = open_checkpoint(write_checkpoint(src, "mcore", tmp_path / "dist", None, dtype=torch.bfloat16))
    assert dist.model.dtype == "bf16"
    assert all(dist.tensors[k].dtype == torch.bfloat16 and torch.equal(dist.tensors[k], logical[k].bfloat16())
               for k in logical)
    sizes = {k: v.properties.dtype for k, v in load_dcp_metadata(tmp_path / "dist" / METADATA).state_dict_metadata.items()
             if hasattr(v, "chunks")}
    assert set(sizes.values()) == {torch.bfloat16}


def test_source_is_read_one_unit_at_a_time_each_chunk_once(tmp_path, monkeypatch):
    model = tiny_model("internlm1")
    logical = random_logical(model, 33)
    src = open_checkpoint(write_internevo(tmp_path / "src", logical, model, 1, 1, 1))
    write_checkpoint(src, "mcore", tmp_path / "dist", None)
    reads = []
    original = DistTensors._read_chunk
    monkeypatch.setattr(DistTensors, "_read_chunk",
                        lambda self, key, chunk, files: reads.append((key, tuple(chunk.offsets)))
                        or original(self, key, chunk, files))
    dist = open_checkpoint(tmp_path / "dist")
    assert reads == [] and dist.tensors.cache == {}  # opening reads the metadata only
    largest = max(len(keys) for keys in model_units(model))
    for key in logical_keys(model):
        assert torch.equal(dist.tensors[key], logical[key]), key
        assert len(dist.tensors.cache) <= largest
    stored = [(k.fqn, tuple(k.offset)) for k in load_dcp_metadata(tmp_path / "dist" / METADATA).storage_data
              if k.offset is not None]
    assert sorted(reads) == sorted(stored)  # every chunk once, never an extra-state object


class _Evil:
    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_damaged_and_hostile_folders_are_named(tmp_path):
    model = tiny_model("internlm2")
    src = open_checkpoint(write_internevo(tmp_path / "src", random_logical(model, 34), model, 1, 1, 1))
    good = write_checkpoint(src, "mcore", tmp_path / "dist", None)
    # a truncated data file: named with the tensor whose chunk runs past its end
    truncated = _copy(good, tmp_path / "truncated")
    (truncated / DATA_FILE).write_bytes((truncated / DATA_FILE).read_bytes()[:-5000])
    with pytest.raises(CheckpointError, match=r"__0_0.distcp: tensor output_layer.weight .* is truncated"):
        open_checkpoint(truncated)
    # a missing data file
    missing = _copy(good, tmp_path / "missing")
    (missing / DATA_FILE).unlink()
    with pytest.raises(CheckpointError, match="is missing: no such file"):
        open_checkpoint(missing)
    # a chunk whose bytes are damaged is named when it is read
    damaged = _copy(good, tmp_path / "damaged")
    info = next(v for k, v in load_dcp_metadata(damaged / METADATA).storage_data.items()
                if k.fqn == "embedding.word_embeddings.weight")
    data = bytearray((damaged / DATA_FILE).read_bytes())
    data[info.offset:info.offset + 64] = b"\0" * 64
    (damaged / DATA_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="tensor embedding.word_embeddings.weight .* cannot be read"):
        open_checkpoint(damaged).tensors["tok_embeddings.weight"]
    # ... and a conversion from it fails after opening its output files, leaving nothing behind
    with pytest.raises(CheckpointError, match="tensor embedding.word_embeddings.weight .* cannot be read"):
        write_checkpoint(open_checkpoint(damaged), "hf", tmp_path / "out", None)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder either
    # a checkpoint of another model size
    other = dataclasses.replace(model, ffn_hidden_size=model.ffn_hidden_size * 2)
    with pytest.raises(CheckpointError, match=r"tensor decoder.layers.mlp.linear_fc1.weight has shape"):
        open_checkpoint(good, other)
    # an unknown tensor, and chunks that do not cover a layer
    for name, edit, message in [
        ("extra", lambda md: md.state_dict_metadata.update(
            stray=md.state_dict_metadata["decoder.final_layernorm.weight"]), "unexpected tensor stray"),
        ("gap", lambda md: md.state_dict_metadata["decoder.layers.mlp.linear_fc1.weight"].chunks.pop(),
         r"linear_fc1.weight layer 5: its chunks cover \d+ of \d+ elements"),
    ]:
        folder = _copy(good, tmp_path / name)
        md = load_dcp_metadata(folder / METADATA)
        edit(md)
        (folder / METADATA).write_bytes(pickle.dumps(md))
        with pytest.raises(CheckpointError, match=message):
            open_checkpoint(folder)
    # a malicious metadata pickle is refused, not run
    _Evil.marker = tmp_path / "pwned"
    hostile = _copy(good, tmp_path / "hostile")
    (hostile / METADATA).write_bytes(pickle.dumps({"x": _Evil()}))
    with pytest.raises(CheckpointError, match=r"\.metadata: cannot be read .*refusing to load posix.system"):
        open_checkpoint(hostile)
    # extra-state objects are never unpickled: a hostile one does not stop a conversion, nor run
    evil_state = _copy(good, tmp_path / "evil_state")
    md = load_dcp_metadata(evil_state / METADATA)
    payload = pickle.dumps(_Evil())
    first = next(k for k in md.storage_data if k.offset is None)
    info = md.storage_data[first]
    data = bytearray((evil_state / DATA_FILE).read_bytes())
    data[info.offset:info.offset + info.length] = payload.ljust(info.length, b".")
    (evil_state / DATA_FILE).write_bytes(bytes(data))
    assert compare(open_checkpoint(evil_state), src) == []
    assert not _Evil.marker.exists()
