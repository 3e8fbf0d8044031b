"""Hugging Face export/import against transformers' own LlamaForCausalLM and InternEvo's logits."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from adapter.checkpoint.convert import compare, open_checkpoint, write_checkpoint
from adapter.checkpoint.formats.hf import hf_config, hf_to_internevo, internevo_to_hf
from adapter.checkpoint.convert import write_streaming
from tests.checkpoint.test_bridge import FIXTURES, tiny_model
from tests.model.workers import random_logical

transformers = pytest.importorskip("transformers")


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def llama(folder):
    model = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@pytest.mark.parametrize("family", ["internlm1", "internlm2"])
def test_export_gives_internevo_logits_in_transformers(tmp_path, family):
    fixture = FIXTURES / f"{family}_tiny"
    src = open_checkpoint(fixture / "ckpt")
    out = write_checkpoint(src, "hf", tmp_path / "hf", None)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["attention_bias"] is (family == "internlm1")
    with torch.no_grad():
        logits = llama(out)(torch.load(fixture / "tokens.pt", weights_only=True)).logits
    assert rel(logits, torch.load(fixture / "logits.pt", weights_only=True)) <= 1e-5
    back = open_checkpoint(out)
    assert back.model.family == family and compare(back, src) == []


def test_negative_control_swapped_gate_and_up(tmp_path):
    fixture = FIXTURES / "internlm1_tiny"
    src = open_checkpoint(fixture / "ckpt")
    tensors = dict(src.tensors.items())
    tensors["blocks.0.mlp.w1.weight"], tensors["blocks.0.mlp.w3.weight"] = (
        tensors["blocks.0.mlp.w3.weight"], tensors["blocks.0.mlp.w1.weight"])
    out = write_checkpoint(dataclasses.replace(src, tensors=tensors), "hf", tmp_path / "hf", None)
    with torch.no_grad():
        logits = llama(out)(torch.load(fixture / "tokens.pt", weights_only=True)).logits
    assert rel(logits, torch.load(fixture / "logits.pt", weights_only=True)) > 1e-3


@pytest.mark.parametrize("no_bias", [True, False])
def test_gqa_round_trip_and_bad_inputs(no_bias):
    import dataclasses

    model = dataclasses.replace(tiny_model("internlm2"), no_bias=no_bias)
    logical = random_logical(model, 11)
    hf = internevo_to_hf(logical, model)
    assert hf["model.layers.0.self_attn.k_proj.weight"].shape == (4 * model.head_dim, model.hidden_size)
    assert ("model.layers.0.self_attn.q_proj.bias" in hf) is (not no_bias)
    back = hf_to_internevo(hf, model)
    assert list(back) == list(logical) and all(torch.equal(back[k], logical[k]) for k in logical)
    broken = dict(hf)
    del broken["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        hf_to_internevo(broken, model)
    broken = {**hf, "model.layers.9.foo": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected tensor model.layers.9.foo"):
        hf_to_internevo(broken, model)
    broken = {**hf, "lm_head.weight": hf["lm_head.weight"][:-1]}
    with pytest.raises(ValueError, match="lm_head.weight has shape"):
        hf_to_internevo(broken, model)


def test_official_internlm2_naming_is_read():
    model = tiny_model("internlm2")
    logical = random_logical(model, 12)
    official = {}
    for key, value in logical.items():  # InternLM2ForCausalLM's published names
        key = key if key == "output.weight" else "model." + key
        official[key] = value
    back = hf_to_internevo(official, model)
    assert all(torch.equal(back[k], logical[k]) for k in logical)


def test_sharded_safetensors_with_index(tmp_path):
    model = tiny_model("internlm1")
    logical = random_logical(model, 13)
    (tmp_path / "hf").mkdir()
    write_streaming(logical, model, "hf", None, tmp_path / "hf", shard_bytes=200_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = open_checkpoint(tmp_path / "hf")
    assert all(torch.equal(back.tensors[k], logical[k]) for k in logical)
    assert hf_config(model)["intermediate_size"] == model.ffn_hidden_size


def test_export_copies_the_tokenizer(tmp_path, capsys):
    """``--tokenizer DIR`` puts a tokenizer saved by transformers beside the weights, so the export loads with
    ``AutoTokenizer``; it is refused for other formats and for a folder without one, before anything is
    written."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from adapter.cli.ckpt import main

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    src = FIXTURES / "internlm2_tiny" / "ckpt"
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "hf", "--tokenizer", str(tmp_path / "tok")]) == 0
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert loaded("hello world")["input_ids"] == [1, 2]
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(src), str(tmp_path / "o2"), "--to", "hf", "--tokenizer", str(tmp_path / "empty")]) == 1
    assert main(["convert", str(src), str(tmp_path / "o3"), "--to", "internevo", "--tokenizer",
                 str(tmp_path / "tok")]) == 2
    assert "goes with --to hf" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
