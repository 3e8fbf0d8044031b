"""Normalisation: InternEvo's defaults and variant forms collapse into one typed config."""

from __future__ import annotations

import pytest

from adapter.config import ConfigError, load_config, normalize, read_config
from adapter.config.normalize import ffn_hidden_size
from tests.conftest import base_sections


def _norm(make_config, sections):
    return normalize(load_config(make_config(sections)))


def test_mlp_size_rule():
    assert ffn_hidden_size(4096, 8 / 3) == 11008
    assert ffn_hidden_size(6144, 8 / 3) == 16384
    assert ffn_hidden_size(4096, 3.5) == 14336
    assert ffn_hidden_size(64, 8 / 3) == 256  # rounded up to the multiple of 256


@pytest.mark.parametrize("zero1, size, fsdp", [(8, 8, False), (-1, -1, False), (dict(size=4), 4, False),
                                               (dict(size=2, fsdp=True), 2, True), (None, -1, False)])
def test_zero1_forms(make_config, zero1, size, fsdp):
    s = base_sections()
    if zero1 is None:
        del s["parallel"]["zero1"]
    else:
        s["parallel"]["zero1"] = zero1
    p = _norm(make_config, s).parallel
    assert (p.zero1_size, p.fsdp) == (size, fsdp)


@pytest.mark.parametrize("tensor, legacy_sp, size, mode, sp", [
    (2, None, 2, "mtp", False),
    (dict(size=2), None, 2, "mtp", False),
    (dict(size=2, mode="msp"), None, 2, "msp", True),
    (dict(size=2, mode="fsp"), None, 2, "fsp", True),
    (2, True, 2, "msp", True),  # legacy top-level flag with an int tensor size
    (dict(size=2, mode="mtp"), True, 2, "mtp", False),  # an explicit mode wins, as in InternEvo 0.5.2
    (None, None, 1, "mtp", False),
])
def test_tensor_forms(make_config, tensor, legacy_sp, size, mode, sp):
    s = base_sections()
    s["model"]["num_attention_heads"] = 4
    if tensor is None:
        del s["parallel"]["tensor"]
    else:
        s["parallel"]["tensor"] = tensor
    if legacy_sp is not None:
        s["parallel"]["sequence_parallel"] = legacy_sp
    p = _norm(make_config, s).parallel
    assert (p.tensor_size, p.tensor_mode, p.sequence_parallel) == (size, mode, sp)


@pytest.mark.parametrize("pipeline, size, overlap", [(2, 2, False), (dict(size=2), 2, False),
                                                     (dict(size=2, interleaved_overlap=True), 2, True)])
def test_pipeline_forms(make_config, pipeline, size, overlap):
    s = base_sections()
    s["parallel"]["pipeline"] = pipeline
    p = _norm(make_config, s).parallel
    assert (p.pipeline_size, p.interleaved_overlap) == (size, overlap)


@pytest.mark.parametrize("dtype, expected, tf32", [("torch.bfloat16", "bf16", False), ("torch.float16", "fp16", False),
                                                   ("torch.half", "fp16", False), ("torch.float32", "fp32", False),
                                                   ("torch.tf32", "fp32", True), (None, "fp16", False)])
def test_dtype_strings(make_config, dtype, expected, tf32):
    s = base_sections()
    if dtype is None:
        del s["model"]["dtype"]
    else:
        s["model"]["dtype"] = dtype
    cfg = _norm(make_config, s)
    assert (cfg.model.dtype, cfg.model.tf32) == (expected, tf32)
    if dtype is None:
        assert cfg.defaulted["model.dtype"] == "torch.float16"


@pytest.mark.parametrize("value, ratio", [(True, 1.0), (False, 0.0), (0.5, 0.5), (0, 0.0), (1, 1.0)])
def test_checkpoint_forms(make_config, value, ratio):
    s = base_sections()
    s["model"]["checkpoint"] = value
    assert _norm(make_config, s).model.checkpoint == ratio


def test_num_chunks_lives_under_model_and_defaults(make_config):
    s = base_sections()
    s["model"]["num_chunks"] = 2
    del s["model"]["use_flash_attn"]
    del s["data"]["micro_num"]
    cfg = _norm(make_config, s)
    assert cfg.model.num_chunks == 2
    assert cfg.model.use_flash_attn is True and cfg.defaulted["model.use_flash_attn"] is True
    assert cfg.data.micro_num == 1 and cfg.data.gradient_accumulation == 1 and cfg.data.valid_micro_num == 1
    assert cfg.data.packed_length == 32 and cfg.data.min_length == 0
    assert cfg.beta2_scheduler.init_beta2 == 0.95 and cfg.lr_scheduler.warmup_steps == 2
    assert cfg.ckpt.auto_resume is True and cfg.ckpt.checkpoint_every is None
    assert cfg.model.family == "internlm1" and cfg.model.num_kv_attention_heads == 4
    assert cfg.model.qkv_bias and cfg.model.out_proj_bias


def test_internlm2_bias_and_gqa(make_config):
    s = base_sections()
    s["model_type"] = "INTERNLM2_PUBLIC"
    s["model"].update(num_kv_attention_heads=2, no_bias=True, rope_base=1e6)
    m = _norm(make_config, s).model
    assert (m.family, m.num_kv_attention_heads, m.qkv_bias, m.out_proj_bias, m.rope_base) == ("internlm2", 2, False,
                                                                                             False, 1e6)
    s["model"]["no_bias"] = False
    assert _norm(make_config, s).model.qkv_bias is True


def test_ckpt_rules(make_config, tmp_path):
    s = base_sections()
    s["ckpt"] = dict(enable_save_ckpt=True, save_ckpt_folder="local:/c", checkpoint_every=50, async_upload=True,
                     oss_snapshot_freq=12345)
    path = make_config(s)
    path.write_text(path.read_text().replace("12345", 'float("inf")'))  # InternEvo's "disabled"
    c = normalize(load_config(path)).ckpt
    assert c.async_upload is False  # local folders save synchronously, as in InternEvo
    assert c.snapshot_ckpt_folder == "local:/c/snapshot" and c.oss_snapshot_freq is None
    s["ckpt"].update(save_ckpt_folder="boto3:s3://bucket.10.0.0.1/k", oss_snapshot_freq=25)
    c = _norm(make_config, s).ckpt
    assert c.async_upload is True and c.async_upload_tmp_folder == "/dev/shm/internlm_tmp_ckpt/"
    assert c.oss_snapshot_freq == 25


def test_skip_and_rampup_are_parsed(make_config):
    s = base_sections()
    s["data"].update(skip_batches="3-5, 9", rampup_batch_size="2 1 4")
    d = _norm(make_config, s).data
    assert d.skip_batches == ((3, 5), (9, 9)) and d.rampup_batch_size == (2, 1, 4)


def test_yaml_equals_python(make_config, tmp_path):
    import yaml

    s = base_sections()
    py = _norm(make_config, s)
    ypath = tmp_path / "cfg.yaml"
    ypath.write_text(yaml.safe_dump(s).replace("0.001", "1e-3"))  # PyYAML reads 1e-3 as a string
    ya = normalize(load_config(ypath))
    assert (ya.model, ya.parallel, ya.data, ya.adam, ya.lr_scheduler) == (py.model, py.parallel, py.data, py.adam,
                                                                           py.lr_scheduler)


@pytest.mark.parametrize("section, key, value, message", [
    ("model", "num_layers", "4", "model.num_layers: must be an integer, got str '4'"),
    ("model", "num_layers", True, "model.num_layers: must be an integer"),
    ("model", "num_layers", 0, "model.num_layers: must be >= 1, got 0"),
    ("model", "mlp_ratio", "8/3", "model.mlp_ratio: must be a number"),
    ("model", "dtype", "torch.bf16", "model.dtype: must be one of .* \\(did you mean 'torch.bfloat16'\\?\\)"),
    ("model", "checkpoint", 1.5, "model.checkpoint: must be True, False or a fraction"),
    ("model", "use_flash_attn", 1, "model.use_flash_attn: must be True or False"),
    ("model", "num_kv_attention_heads", 2, "InternLM1 .* has no grouped-query attention"),
    ("model", "no_bias", True, "InternLM1 always has qkv"),
    ("model", "num_attentoin_heads", 4, "unknown key `num_attentoin_heads` \\(did you mean 'num_attention_heads'\\?\\)"),
    ("data", "micro_bsz", None, "data.micro_bsz: must be an integer, got NoneType"),
    ("data", "rampup_batch_size", "1 2", "data.rampup_batch_size: must be '' or three"),
    ("data", "skip_batches", "5-3", "ends before it starts"),
    ("data", "gradient_accumulation", 3, "must equal data.micro_num \\(4\\)"),
    ("adam", "lr", -1.0, "adam.lr: must be >= 0.0"),
    ("adam", "adam_beta2", 1.5, "adam.adam_beta2: must be <= 1.0"),
    ("parallel", "tensor", dict(size=2, mode="xsp"), "parallel.tensor.mode: must be one of"),
    ("parallel", "zero1", "8", "parallel.zero1: must be an integer"),
    ("parallel", "weight", dict(size=2), "weight parallel \\(2\\) is only supported with tensor mode 'isp'"),
    ("ckpt", "enable_save_ckpt", True, "ckpt.checkpoint_every: is required"),
    ("ckpt", "load_ckpt_info", dict(path="/x", ckpt_type="megatron"), "unknown ckpt_type 'megatron'"),
    ("hybrid_zero_optimizer", "clip_grad_norm", "1", "hybrid_zero_optimizer.clip_grad_norm: must be a number"),
])
def test_field_errors_name_field_and_line(make_config, section, key, value, message):
    s = base_sections()
    s[section][key] = value
    path = make_config(s)
    line = list(s).index(section) + 1
    with pytest.raises(ConfigError, match=message) as info:
        read_config(path)
    assert str(info.value).startswith(f"{path}:{line}: "), str(info.value)


def test_required_and_unknown_top_level(make_config):
    s = base_sections()
    del s["model"]["hidden_size"]
    with pytest.raises(ConfigError, match="model.hidden_size: is required"):
        read_config(make_config(s))
    s = base_sections()
    s["modle"] = dict(x=1)
    with pytest.raises(ConfigError, match="unknown key `modle` \\(did you mean 'model'\\?\\)"):
        read_config(make_config(s))
    s = base_sections()
    s["model_type"] = "INTERNLM3"
    with pytest.raises(ConfigError, match="unsupported model_type 'INTERNLM3'"):
        read_config(make_config(s))
    s = base_sections()
    s["SOME_HELPER"] = 3  # ALL-CAPS names are helper variables, as in the seed configs
    read_config(make_config(s))
