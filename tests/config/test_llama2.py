"""InternEvo 0.5.2's ``model_type = "LLAMA2"``: its configs load, validate and translate.

The expectations come from InternEvo 0.5.2's ``Llama2`` (``internlm/model/modeling_llama.py``) and from the
InternEvo-written fixture ``tests/fixtures/internevo/llama2_tiny`` (its README has the model table): GQA, biases on
``wq``/``wk``/``wv``/``wo`` unless ``no_bias=True``, no MLP bias, untied embeddings, RMSNorm.
"""

from __future__ import annotations

import json

import pytest
import yaml

from adapter.config import ConfigError, read_config
from adapter.config.convert import render
from adapter.config.report import field_reports
from tests.config.test_translation_agreement import parse_args
from tests.conftest import FIXTURES, base_sections

CONFIG = FIXTURES / "llama2_tiny" / "config.py"

#: Every keyword of ``Llama2.__init__`` a config supplies (the builder sets first/last/start_layer_idx/device),
#: with InternEvo 0.5.2's defaults, plus the three ``create_model`` pops before calling it.
LLAMA2_KEYWORDS = dict(
    num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, vocab_size=128, mlp_ratio=4.0,
    attn_drop_rate=0.0, drop_rate=0.0, dtype="torch.float32", checkpoint=0.0, layer_norm_epsilon=1e-5,
    embed_grad_scale=1, parallel_output=True, apply_post_layer_norm=False, no_bias=False, residual_in_fp32=False,
    norm_type="rmsnorm", qk_interleaved=False, is_reward=False, dropout_selective_checkpoint=True,
    use_scaled_init=True, use_swiglu=True, embedding_init_std=0.02, attn_wqkv_init_std=0.02,
    attn_other_init_std=0.02, ffn_uplayer_init_std=0.02, ffn_other_init_std=0.02, out_head_init_std=0.02,
    init_type="normal", rope_base=10000, mlp_layer_fusion=False, multiple_of=256,
    num_chunks=1, use_flash_attn=False, embed_split_hidden=True,
)


def test_the_internevo_fixture_config_loads_and_normalises():
    cfg, layout = read_config(CONFIG, world_size=1)
    m = cfg.model
    assert (m.model_type, m.family) == ("LLAMA2", "llama2")
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_kv_attention_heads, m.vocab_size) == (
        2, 64, 4, 2, 128)
    assert m.head_dim == 16 and m.ffn_hidden_size == 256  # 256 * ceil(int(64 * 8/3) / 256), README
    assert m.no_bias is False and m.qkv_bias is True and m.out_proj_bias is True  # InternEvo's no_bias=False
    assert (m.norm_type, m.layer_norm_epsilon, m.rope_base, m.qk_interleaved) == ("rmsnorm", 1e-5, 10000.0, False)
    assert (m.dtype, m.drop_rate, m.attn_drop_rate, m.residual_in_fp32) == ("fp32", 0.0, 0.0, False)
    assert (layout.tp, layout.pp, layout.dp) == (1, 1, 1)


def test_the_internevo_fixture_config_translates():
    cfg, layout = read_config(CONFIG, world_size=1)
    files = render(cfg, layout)
    mcore = yaml.safe_load(files["transformer_config.yaml"])
    tc, model = mcore["transformer_config"], mcore["model"]
    assert (tc["num_query_groups"], tc["kv_channels"], tc["ffn_hidden_size"]) == (2, 16, 256)
    assert tc["add_qkv_bias"] is True and tc["add_bias_linear"] is False and tc["normalization"] == "RMSNorm"
    assert tc["gated_linear_unit"] is True and tc["rotary_interleaved"] is False
    assert model["family"] == "llama2"  # the same megatron-core model as InternLM2, named for the checkpoint code
    assert model["qkv_bias"] is True and model["out_proj_bias"] is True
    assert model["share_embeddings_and_output_weights"] is False  # tok_embeddings and output are separate
    args = parse_args(files["megatron_args.txt"])
    assert args["--group-query-attention"] is True and args["--num-query-groups"] == "2"
    assert args["--add-qkv-bias"] is True and args["--untie-embeddings-and-output-weights"] is True
    assert "--add-bias-linear" in files["megatron_args.txt"]  # the comment: wo's bias has no exact equivalent
    report = json.loads(files["report.json"])
    assert report["family"] == "llama2"
    ds = json.loads(files["ds_config.json"])
    assert ds["train_batch_size"] == 4 and "fp16" not in ds and "bf16" not in ds


def test_beta2_schedule_of_the_fixture_is_reported():
    """The fixture's c=0.8: beta2 = max(0.95, 1 - k**-0.8) stays 0.95 for k < 43 (README), which AdamW cannot do."""
    cfg, _ = read_config(CONFIG)
    row = {r.path: r for r in field_reports(cfg)}["beta2_scheduler.c"]
    assert row.status == "unsupported" and "from step 43" in row.note


def test_no_bias_drops_every_attention_bias(make_config):
    s = _llama2()
    s["model"]["no_bias"] = True
    cfg, _ = read_config(make_config(s))
    assert (cfg.model.qkv_bias, cfg.model.out_proj_bias) == (False, False)


def test_every_keyword_of_internevos_llama2_is_accepted(make_config):
    s = _llama2()
    s["model"] = dict(LLAMA2_KEYWORDS)
    cfg, _ = read_config(make_config(s))
    assert cfg.model.family == "llama2" and cfg.model.ffn_hidden_size == 256


@pytest.mark.parametrize("key, value", [("max_position_embeddings", 2048), ("use_dynamic_ntk_rope", False),
                                        ("norm_head", False), ("adapt_hf", True), ("deepnorm", False),
                                        ("num_experts", 1), ("moe_type", "GShard"), ("moe_use_residual", False)])
def test_keys_llama2_does_not_take_are_refused(make_config, key, value):
    """``create_model`` passes the model section to ``Llama2(**kwargs)``: InternEvo would stop with a TypeError."""
    s = _llama2()
    s["model"][key] = value
    path = make_config(s)
    with pytest.raises(ConfigError, match=f"model_type 'LLAMA2' does not take `{key}`") as info:
        read_config(path)
    assert info.value.field == f"model.{key}" and info.value.line == list(s).index("model") + 1


def _llama2() -> dict:
    s = base_sections()
    s["model_type"] = "LLAMA2"
    s["model"]["num_kv_attention_heads"] = 2
    return s
