"""InternEvo 0.5.2's ``LLAMA2`` model type through the bridge, against InternEvo's own checkpoint and logits
(``tests/fixtures/internevo/llama2_tiny``) with transformers' Llama as the numerical oracle."""

from __future__ import annotations

import json

import pytest
import torch

from adapter.checkpoint.convert import open_checkpoint, target_layout, write_checkpoint
from tests.conftest import FIXTURES

transformers = pytest.importorskip("transformers")
FIXTURE = FIXTURES / "llama2_tiny"


def hf_logits(folder, tokens: torch.Tensor) -> torch.Tensor:
    llama = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    with torch.no_grad():
        return llama(tokens).logits


def test_layouts_then_hf_give_internevo_logits(tmp_path):
    """InternEvo's folder (no config given) → InternEvo tp2×pp2 → Megatron-LM tp2 → megatron-core → HF:
    transformers' Llama gives InternEvo's logits; back to InternEvo at tp1 is InternEvo's file bit for bit."""
    src = open_checkpoint(FIXTURE / "ckpt")
    assert (src.model.family, src.model.num_kv_attention_heads, src.model.qkv_bias) == ("llama2", 2, True)
    model = src.model
    write_checkpoint(src, "internevo", tmp_path / "ie", target_layout(model, 2, 2, 1))
    shard = torch.load(tmp_path / "ie" / "model_tp1_pp0.pt", weights_only=True)
    assert shard["layers.0.attention.wk.weight"].shape == (16, 64)  # one kv head of two: its own rows
    assert "layers.0.attention.wo.bias" not in shard  # the row-parallel bias lives in the tp-0 file only
    write_checkpoint(open_checkpoint(tmp_path / "ie"), "mcore-legacy", tmp_path / "mlm", target_layout(model, 2, 1, 1))
    write_checkpoint(open_checkpoint(tmp_path / "mlm", model), "mcore", tmp_path / "mc", None)
    write_checkpoint(open_checkpoint(tmp_path / "mc"), "hf", tmp_path / "hf", None)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["attention_bias"] is True and config["num_key_value_heads"] == 2

    tokens = torch.load(FIXTURE / "tokens.pt", weights_only=True)
    expected = torch.load(FIXTURE / "logits.pt", weights_only=True)
    got = hf_logits(tmp_path / "hf", tokens)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-5

    back = open_checkpoint(tmp_path / "hf")
    assert back.model.family == "llama2"
    write_checkpoint(back, "internevo", tmp_path / "ie1", target_layout(model, 1, 1, 1))
    original = torch.load(FIXTURE / "ckpt" / "model_tp0_pp0.pt", weights_only=True)
    again = torch.load(tmp_path / "ie1" / "model_tp0_pp0.pt", weights_only=True)
    assert list(again) == list(original)
    assert all(torch.equal(again[k], original[k]) for k in original)


def test_a_plain_llama_folder_is_llama(tmp_path):
    """An HF Llama folder that this tool did not write (no family key in config.json) is Llama, whether or
    not it has attention biases and GQA; a folder we exported comes back as the family it left."""
    src = open_checkpoint(FIXTURE / "ckpt")
    write_checkpoint(src, "hf", tmp_path / "ours", None)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config.pop("internevo_model_type") == "LLAMA2"
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps(config))
    (plain / "model.safetensors").write_bytes((tmp_path / "ours" / "model.safetensors").read_bytes())
    assert open_checkpoint(plain).model.family == "llama2"
    internlm1 = open_checkpoint(FIXTURES / "internlm1_tiny" / "ckpt")
    write_checkpoint(internlm1, "hf", tmp_path / "i1", None)
    assert open_checkpoint(tmp_path / "i1").model.family == "internlm1"


def test_tied_embeddings_are_read(tmp_path):
    """A Llama folder with ``tie_word_embeddings`` and no ``lm_head.weight`` (transformers saves it so) reads
    its head from the embedding."""
    from safetensors.torch import load_file, save_file

    src = open_checkpoint(FIXTURE / "ckpt")
    write_checkpoint(src, "hf", tmp_path / "hf", None)
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    tied = open_checkpoint(tmp_path / "hf")
    assert torch.equal(tied.tensors["output.weight"], tied.tensors["tok_embeddings.weight"])
