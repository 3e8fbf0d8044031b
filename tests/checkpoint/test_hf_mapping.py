"""The pure-tensor mapping InternEvo (logical, tp=1 pp=1) ⇄ Hugging Face ``LlamaForCausalLM``.

The oracle is transformers' own Llama: fed the converted fixture weights, it must give the logits that
InternEvo 0.5.2 itself computed for those weights (``logits.pt``). A negative control shows that the
tolerance is tight enough to catch a swapped gate/up or a wrong qkv order.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from adapter.checkpoint.formats.hf import hf_config, hf_to_internevo, internevo_to_hf
from adapter.config import read_config
from adapter.config.schema import ModelConfig

from tests.conftest import FIXTURES

transformers = pytest.importorskip("transformers")

FAMILIES = ["internlm1", "internlm2"]
TOL = 1e-5


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


@functools.lru_cache(maxsize=None)
def fixture(family: str) -> tuple[ModelConfig, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(model config, logical state dict, tokens, InternEvo's logits) of ``{family}_tiny``."""
    folder = FIXTURES / f"{family}_tiny"
    if not folder.exists():
        pytest.skip(f"fixture {folder} not present")
    cfg, _ = read_config(folder / "config.py")
    sd = torch.load(folder / "ckpt" / "model_tp0_pp0.pt", weights_only=True, map_location="cpu")
    tokens = torch.load(folder / "tokens.pt", weights_only=True)
    logits = torch.load(folder / "logits.pt", weights_only=True)
    return cfg.model, sd, tokens, logits


def hf_logits(model: ModelConfig, hf_sd: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    config = transformers.LlamaConfig(**hf_config(model))
    config._attn_implementation = "eager"  # deterministic, and the same math as InternEvo's torch attention
    llama = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    llama.load_state_dict(hf_sd, strict=True)
    with torch.no_grad():
        return llama(tokens).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_logits_in_transformers_llama(family):
    model, sd, tokens, ref = fixture(family)
    assert model.family == family
    hf = internevo_to_hf(sd, model)
    err = rel(hf_logits(model, hf, tokens), ref)
    print(f"{family}: relative error vs InternEvo logits {err:.3e}")
    assert err <= TOL
    back = hf_to_internevo(hf, model)
    assert sorted(back) == sorted(sd)  # same keys; the order is the module's (logical_keys)
    for key in sd:
        assert back[key].dtype == sd[key].dtype and torch.equal(back[key], sd[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_config_fields(family):
    model, *_ = fixture(family)
    cfg = hf_config(model)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["attention_bias"] is (family == "internlm1")  # the internlm2 fixture has no_bias=True
    assert cfg["mlp_bias"] is False and cfg["tie_word_embeddings"] is False
    assert cfg["num_key_value_heads"] == (4 if family == "internlm1" else 2)
    assert (cfg["head_dim"], cfg["intermediate_size"], cfg["rope_theta"]) == (16, 256, 10000.0)
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    bf16 = hf_config(dataclasses.replace(model, dtype="bf16"))
    assert bf16["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("swap", ["gate_up", "q_k_rows"])
def test_negative_control(swap):
    """A plausible mapping bug moves the logits far beyond the tolerance, so the test above can fail."""
    model, sd, tokens, ref = fixture("internlm1")
    hf = dict(internevo_to_hf(sd, model))
    if swap == "gate_up":
        a, b = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
        hf[a], hf[b] = hf[b], hf[a]
    else:
        a, b = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
        hf[a], hf[b] = hf[b], hf[a]
    err = rel(hf_logits(model, hf, tokens), ref)
    assert err > 100 * TOL, err  # measured: gate/up 0.06, q/k 5e-3 (tiny attention weights)


def gqa_model(no_bias: bool) -> ModelConfig:
    """InternLM2 with GQA (H=64, 4 heads, 2 kv heads) and 3 layers, from the fixture's config."""
    model, *_ = fixture("internlm2")
    return dataclasses.replace(model, num_layers=3, num_attention_heads=4, num_kv_attention_heads=2,
                               no_bias=no_bias, dtype="bf16")


def random_logical(model: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random bf16 InternLM2 logical tensors (shapes written out here, independently of the module)."""
    g = torch.Generator().manual_seed(seed)
    h, f, v, d = model.hidden_size, model.ffn_hidden_size, model.vocab_size, model.head_dim
    rows = (model.num_attention_heads + 2 * model.num_kv_attention_heads) * d
    shapes = {"tok_embeddings.weight": (v, h)}
    for i in range(model.num_layers):
        shapes[f"layers.{i}.attention.wqkv.weight"] = (rows, h)
        if not model.no_bias:
            shapes[f"layers.{i}.attention.wqkv.bias"] = (rows,)
        shapes[f"layers.{i}.attention.wo.weight"] = (h, h)
        if not model.no_bias:
            shapes[f"layers.{i}.attention.wo.bias"] = (h,)
        shapes[f"layers.{i}.attention_norm.weight"] = (h,)
        shapes[f"layers.{i}.ffn_norm.weight"] = (h,)
        shapes[f"layers.{i}.feed_forward.w1.weight"] = (f, h)
        shapes[f"layers.{i}.feed_forward.w2.weight"] = (h, f)
        shapes[f"layers.{i}.feed_forward.w3.weight"] = (f, h)
    shapes["norm.weight"] = (h,)
    shapes["output.weight"] = (v, h)
    return {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}


@pytest.mark.parametrize("no_bias", [False, True])
def test_gqa_round_trip_is_bit_exact(no_bias):
    model = gqa_model(no_bias)
    logical = random_logical(model, seed=3)
    hf = internevo_to_hf(logical, model)
    d, h = model.head_dim, model.hidden_size
    assert hf["model.layers.0.self_attn.q_proj.weight"].shape == (4 * d, h)
    assert hf["model.layers.0.self_attn.k_proj.weight"].shape == (2 * d, h)
    assert ("model.layers.2.self_attn.v_proj.bias" in hf) is (not no_bias)
    assert ("model.layers.2.self_attn.o_proj.bias" in hf) is (not no_bias)
    assert all(t.dtype == torch.bfloat16 for t in hf.values())
    # the grouped wqkv: kv group 1 is [q2, q3, k1, v1]
    w = logical["layers.1.attention.wqkv.weight"]
    assert torch.equal(hf["model.layers.1.self_attn.q_proj.weight"][2 * d:3 * d], w[4 * d:5 * d])
    assert torch.equal(hf["model.layers.1.self_attn.k_proj.weight"][d:], w[6 * d:7 * d])
    assert torch.equal(hf["model.layers.1.self_attn.v_proj.weight"][d:], w[7 * d:8 * d])
    back = hf_to_internevo(hf, model)
    assert sorted(back) == sorted(logical)
    assert all(back[k].dtype == logical[k].dtype and torch.equal(back[k], logical[k]) for k in logical)
    # transformers accepts the converted dict as-is
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(model)))
    llama.load_state_dict(hf, strict=True)


def test_bad_inputs_name_the_tensor():
    model = gqa_model(no_bias=False)
    logical = random_logical(model, seed=4)
    hf = internevo_to_hf(logical, model)

    broken = dict(hf)
    del broken["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        hf_to_internevo(broken, model)
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.3\.mlp\.up_proj\.weight"):
        hf_to_internevo({**hf, "model.layers.3.mlp.up_proj.weight": torch.zeros(1)}, model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(64, 64\)"):
        hf_to_internevo({**hf, "model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}, model)

    broken = dict(logical)
    del broken["layers.2.attention.wo.bias"]
    with pytest.raises(ValueError, match=r"missing tensor layers\.2\.attention\.wo\.bias"):
        internevo_to_hf(broken, model)
    with pytest.raises(ValueError, match=r"unexpected tensor layers\.0\.attention\.foo"):
        internevo_to_hf({**logical, "layers.0.attention.foo": torch.zeros(1)}, model)
    with pytest.raises(ValueError, match=r"tensor output\.weight has shape \(127, 64\)"):
        internevo_to_hf({**logical, "output.weight": logical["output.weight"][:-1]}, model)
    # a no_bias checkpoint read with a config that expects biases (and the reverse) is caught too
    with pytest.raises(ValueError, match=r"missing tensor .*bias"):
        internevo_to_hf(random_logical(gqa_model(no_bias=True), 5), model)
    with pytest.raises(ValueError, match=r"unexpected tensor .*bias"):
        hf_to_internevo(hf, gqa_model(no_bias=True))


def test_unsupported_models_are_refused():
    model = gqa_model(no_bias=True)
    logical = random_logical(model, seed=6)
    for bad in (dataclasses.replace(model, qk_interleaved=True), dataclasses.replace(model, norm_type="layernorm")):
        with pytest.raises(ValueError):
            hf_config(bad)
        with pytest.raises(ValueError):
            internevo_to_hf(logical, bad)


def official_names(logical: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """InternLM2's published ``InternLM2ForCausalLM`` names: InternEvo's names under ``model.``."""
    return {(k if k == "output.weight" else "model." + k): v for k, v in logical.items()}


@pytest.mark.parametrize("no_bias", [True, False])
def test_official_internlm2_naming_is_read(no_bias):
    model = gqa_model(no_bias)
    logical = random_logical(model, seed=7)
    official = official_names(logical)
    assert "model.layers.0.attention.wqkv.weight" in official and "model.norm.weight" in official
    official["model.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(8)  # old remote code saved it
    back = hf_to_internevo(official, model)
    assert sorted(back) == sorted(logical)
    assert all(torch.equal(back[k], logical[k]) for k in logical)
    # and it round-trips into the Llama layout like an InternEvo checkpoint would
    assert all(torch.equal(a, b) for a, b in zip(internevo_to_hf(back, model).values(),
                                                 internevo_to_hf(logical, model).values()))
    del official["model.layers.1.feed_forward.w3.weight"]
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.feed_forward\.w3\.weight"):
        hf_to_internevo(official, model)


def test_official_fixture_weights_give_internevo_logits():
    """The InternLM2 fixture renamed to the official layout, read back and exported, still matches InternEvo."""
    model, sd, tokens, ref = fixture("internlm2")
    back = hf_to_internevo(official_names(sd), model)
    assert rel(hf_logits(model, internevo_to_hf(back, model), tokens), ref) <= TOL


def test_official_naming_refused_for_internlm1():
    model, *_ = fixture("internlm1")
    with pytest.raises(ValueError, match="official naming"):
        hf_to_internevo({"model.tok_embeddings.weight": torch.zeros(128, 64)}, model)
