"""``verify`` and ``convert`` read every replica and every key: a tampered file is refused in one line naming
the file and the tensor, never joined, cast or dropped silently. Real files, written with ``torch.save``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapter.checkpoint.convert import open_checkpoint
from adapter.checkpoint.errors import CheckpointError
from adapter.checkpoint.formats.internevo import read_internevo
from adapter.cli.ckpt import main
from tests.conftest import FIXTURES

SRC = FIXTURES / "internlm2_tiny" / "ckpt"
CONFIG = FIXTURES / "internlm2_tiny" / "config.py"
RANK1 = "model_tp1_pp0.pt"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """The fixture at tp=2 (InternEvo), as Megatron-LM files at tp=2, and as HF."""
    root = tmp_path_factory.mktemp("replicas")
    assert main(["convert", str(SRC), str(root / "tp2"), "--to", "internevo", "--tp", "2"]) == 0
    assert main(["convert", str(SRC), str(root / "legacy"), "--to", "mcore-legacy", "--tp", "2"]) == 0
    assert main(["convert", str(SRC), str(root / "hf"), "--to", "hf"]) == 0
    return root


def _tampered(folders: Path, tmp_path: Path, edit, name: str = RANK1, config=None) -> Path:
    folder = tmp_path / "tampered"
    shutil.copytree(folders / "tp2", folder)
    state = torch.load(folder / name, weights_only=True)
    edit(state)
    torch.save(state, folder / name)
    if config is not None:
        meta = torch.load(folder / "model_config.pt", weights_only=True)
        meta.update(config)
        torch.save(meta, folder / "model_config.pt")
    return folder


def _both_refuse(capsys, folders: Path, folder: Path, *words: str) -> None:
    """``verify`` against the untouched folder and ``convert`` both exit 1 with one line holding ``words``."""
    for args in (["verify", str(folders / "tp2"), str(folder)], ["convert", str(folder), str(folder.parent / "out"),
                                                                 "--to", "hf"]):
        rc = main(args)
        out, err = capsys.readouterr()
        assert rc == 1 and err.count("\n") == 1 and "match" not in out, (args, err, out)
        assert all(w in err for w in words), err
    assert not (folder.parent / "out").exists()


NORM = "layers.1.ffn_norm.weight"
QKV = "layers.0.attention.wqkv.weight"


@pytest.mark.parametrize("edit, words", [
    (lambda s: s[NORM].add_(1e-3), (f"{RANK1}: {NORM} differs from its replica in model_tp0_pp0.pt",)),
    (lambda s: s.update({NORM: torch.ones(66)}), (f"{NORM} has shape (66,), its replica in model_tp0_pp0.pt (64,)",)),
    (lambda s: s.update({QKV: s[QKV].bfloat16()}), (f"{RANK1}: {QKV} is torch.bfloat16, its piece in",)),
    (lambda s: s.update({QKV: s[QKV].long()}), (f"{RANK1}: {QKV} is torch.int64: a weight must be floating point",)),
    (lambda s: s.update({"layers.0.attention.extra.weight": torch.ones(3)}),
     (f"{RANK1}: unexpected tensor layers.0.attention.extra.weight",)),
], ids=["replica-differs", "replica-shape", "mixed-dtypes", "int64", "extra-key"])
def test_a_tampered_rank1_file_is_refused(capsys, folders, tmp_path, edit, words):
    _both_refuse(capsys, folders, _tampered(folders, tmp_path, edit), *words)


@pytest.mark.parametrize("config, words", [
    (dict(vocab_size=256), ("tok_embeddings.weight (stage 0) is (128, 64) in the files but (256, 64) for the model "
                            "model_config.pt describes",)),
    (dict(num_kv_attention_heads=4), (f"{QKV} (stage 0) is (128, 64) in the files but (192, 64)",)),
], ids=["vocab", "kv-heads"])
def test_a_model_config_contradicting_the_shards_is_refused(capsys, folders, tmp_path, config, words):
    _both_refuse(capsys, folders, _tampered(folders, tmp_path, lambda s: None, config=config), *words)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "torch.bfloat16"], ids=["internevo", "adapter"])
def test_a_model_config_naming_another_dtype_is_reported(capsys, folders, tmp_path, dtype):
    """bf16 in ``model_config.pt`` (InternEvo pickles the dtype, this adapter writes its name) over fp32 shards:
    the tensors still compare equal, and ``verify`` and ``inspect`` say that the file contradicts them."""
    folder = _tampered(folders, tmp_path, lambda s: None, config=dict(dtype=dtype))
    note = f"{folder / 'model_config.pt'}: says dtype bfloat16, but the tensors are float32"
    assert main(["verify", str(folders / "tp2"), str(folder)]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"note: {note}", "match"], err
    assert main(["inspect", str(folder)]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == [note]
    assert main(["inspect", str(folders / "tp2")]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == []


def test_rule_every_replica_of_every_tensor_is_read(folders, tmp_path):
    """For each replicated tensor in turn, one changed value in tensor rank 1's file is found at open (by
    name: the checks compare the replicas' bytes), and every other key, cast to another dtype there, is
    refused at open from the headers alone."""
    ckpt = open_checkpoint(folders / "tp2")
    state = torch.load(folders / "tp2" / RANK1, weights_only=True)
    replicated = [key for key, (_, file_key, stored) in ckpt.tensors.index.items() if stored.split == "replicated"]
    assert len(replicated) == 5  # two norms per layer and the final norm
    for key in state:
        folder = _tampered(folders, tmp_path / key, lambda s: s.update({key: s[key].double()}))
        with pytest.raises(CheckpointError, match=f"{RANK1}: {key} is torch.float64"):
            open_checkpoint(folder)
    for key in replicated:
        folder = _tampered(folders, tmp_path / ("value-" + key), lambda s: s[key].view(-1)[-1].add_(1))
        with pytest.raises(CheckpointError, match=f"{RANK1}: {key} differs from its replica"):
            open_checkpoint(folder)


def test_megatron_lm_files_are_read_replica_by_replica(capsys, folders, tmp_path):
    rank1 = Path("iter_0000000") / "mp_rank_01" / "model_optim_rng.pt"
    norm, qkv = "decoder.layers.0.input_layernorm.weight", "decoder.layers.0.self_attention.linear_qkv.weight"
    for edit, words in ((lambda m: m[norm].add_(1), f"{rank1}: {norm} differs from its replica in "),
                        (lambda m: m.update({qkv: m[qkv].bfloat16()}), f"{rank1} ['model']: {qkv} is torch.bfloat16"),
                        (lambda m: m.update({qkv: m[qkv].long()}), f"{qkv} is torch.int64: a weight must be floating")):
        folder = tmp_path / "legacy"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(folders / "legacy", folder)
        state = torch.load(folder / rank1, weights_only=False)
        edit(state["model"])
        torch.save(state, folder / rank1)
        rc = main(["verify", str(folders / "tp2"), str(folder), "--config", str(CONFIG)])
        out, err = capsys.readouterr()
        assert rc == 1 and err.count("\n") == 1 and words in err and "match" not in out, err


def test_an_integer_weight_in_safetensors_is_refused(capsys, folders, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(folders / "hf", folder)
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key].long()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert main(["verify", str(folders / "hf"), str(folder)]) == 1
    err = capsys.readouterr().err
    assert err == f"internlm-ckpt: error: {folder / 'model.safetensors'}: {key} is torch.int64: a weight must be " \
                  "floating point\n"


def test_a_check_of_some_stages_reads_only_their_files(folders, tmp_path):
    """``validate(stages)`` (how a resume deals a folder's checks out to the ranks) finds a stray tensor in a
    stage-1 file when it checks stage 1, and passes over it, never opening that file, when it checks stage 0."""
    assert main(["convert", str(folders / "tp2"), str(tmp_path / "pp2"), "--to", "internevo", "--tp", "2",
                 "--pp", "2"]) == 0
    stray = tmp_path / "pp2" / "model_tp1_pp1.pt"
    torch.save({**torch.load(stray, weights_only=True), "layers.3.attention.extra.weight": torch.ones(3)}, stray)
    with pytest.raises(CheckpointError, match="model_tp1_pp1.pt: unexpected tensor layers.3.attention.extra.weight"):
        read_internevo(tmp_path / "pp2").lazy().validate({1})
    tensors = read_internevo(tmp_path / "pp2").lazy()
    tensors.validate({0})
    assert (1, 1, 0) not in tensors.ckpt.opened and (1, 0, 0) in tensors.ckpt.opened
