"""``config.json`` both ways: what transformers reads from our exports, and what we read back from a folder
transformers 4 or 5 wrote. The fixtures all use RoPE base 10000 and 2048 positions, the defaults, so the
values here are moved off them (InternLM2-7B's base 1e6 from its published config)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from adapter.checkpoint.errors import CheckpointError
from adapter.checkpoint.formats.hf import _model_from_config, hf_config
from adapter.config import read_config
from adapter.config.errors import ConfigError
from adapter.config.schema import ModelConfig
from tests.conftest import CONFIGS, FIXTURES

transformers = pytest.importorskip("transformers")

#: What ``config.json`` carries of a model, and so what reading it back must restore.
CARRIED = ("family", "num_layers", "hidden_size", "num_attention_heads", "num_kv_attention_heads", "vocab_size",
           "ffn_hidden_size", "layer_norm_epsilon", "rope_base", "max_position_embeddings", "dtype", "qkv_bias",
           "out_proj_bias")


def variants() -> list[tuple[str, ModelConfig]]:
    out = []
    for family in ("internlm1", "internlm2", "llama2"):
        model = read_config(FIXTURES / f"{family}_tiny" / "config.py")[0].model
        out += [(family, model),
                (f"{family}-moved", dataclasses.replace(model, rope_base=5e5, max_position_embeddings=4096,
                                                        layer_norm_epsilon=1e-5, dtype="bf16")),
                (f"{family}-fp16", dataclasses.replace(model, dtype="fp16"))]
    out.append(("internlm2-7B", read_config(CONFIGS / "internlm2_7B.py")[0].model))
    return out


VARIANTS = variants()


def carried(model: ModelConfig) -> dict:
    return {name: getattr(model, name) for name in CARRIED}


@pytest.mark.parametrize("name, model", VARIANTS, ids=[n for n, _ in VARIANTS])
def test_config_json_round_trips(name, model):
    """Our ``config.json``, and the same config as transformers saves it (``to_dict``: transformers 5 drops
    the flat ``rope_theta`` for ``rope_parameters``), read back to the same model."""
    ours = json.loads(json.dumps(hf_config(model)))
    assert carried(_model_from_config(ours, "ours")) == carried(model)
    saved = json.loads(json.dumps(transformers.LlamaConfig(**ours).to_dict()))
    assert carried(_model_from_config(saved, "saved")) == carried(model)


def test_transformers_reads_internlm2_7b_sizes():
    """Literal values of InternLM2-7B (its published ``config.json``): base 1e6, 8 kv heads, ffn 14336."""
    model = read_config(CONFIGS / "internlm2_7B.py")[0].model
    cfg = transformers.LlamaConfig(**hf_config(model))
    assert cfg.rope_parameters["rope_theta"] == 1e6 and cfg.rope_parameters["rope_type"] == "default"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (4096, 14336, 32)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (32, 8, 128, 92544)
    assert cfg.attention_bias is False and cfg.mlp_bias is False and cfg.tie_word_embeddings is False
    assert cfg.max_position_embeddings == model.max_position_embeddings
    moved = transformers.LlamaConfig(**hf_config(dataclasses.replace(model, max_position_embeddings=32768)))
    assert moved.max_position_embeddings == 32768


def test_dynamic_ntk_is_internevos_scaling_factor():
    """InternEvo's ``DynamicNTKScalingRotaryEmbedding`` rescales the base by
    ``((s * L / max_pos) - (s - 1)) ** (d / (d - 2))`` with ``scaling_factor`` s = 1.0, which is transformers'
    ``dynamic`` RoPE with ``factor`` 1.0 (``_compute_dynamic_ntk_parameters``)."""
    model = read_config(FIXTURES / "internlm1_tiny" / "config.py")[0].model
    ntk = dataclasses.replace(model, use_dynamic_ntk_rope=True, rope_base=5e5, max_position_embeddings=4096)
    cfg = transformers.LlamaConfig(**hf_config(ntk))
    assert cfg.rope_parameters == {"rope_type": "dynamic", "factor": 1.0, "rope_theta": 5e5}
    assert cfg.max_position_embeddings == 4096


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 4.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}])
def test_scaled_rope_is_refused_not_dropped(scaling):
    """A RoPE scaling InternEvo has no counterpart for used to be read as plain RoPE (a different model)."""
    model = read_config(FIXTURES / "llama2_tiny" / "config.py")[0].model
    cfg = json.loads(json.dumps(hf_config(model)))
    for where in ("rope_scaling", "rope_parameters"):  # transformers 4, transformers 5
        edited = dict(cfg, **{where: dict(scaling, rope_theta=10000.0)})
        with pytest.raises(CheckpointError, match="RoPE scaling"):
            _model_from_config(edited, "scaled")


def test_dynamic_ntk_is_refused_like_a_config():
    model = read_config(FIXTURES / "internlm1_tiny" / "config.py")[0].model
    cfg = json.loads(json.dumps(hf_config(dataclasses.replace(model, use_dynamic_ntk_rope=True))))
    with pytest.raises(ConfigError, match="dynamic NTK rotary scaling is not supported"):
        _model_from_config(cfg, "ntk")
