"""The shipped configs convert, and the key values of every output are pinned."""

from __future__ import annotations

import json

import pytest
import yaml

from adapter.config import read_config
from adapter.config.convert import render
from tests.conftest import CONFIGS
from tests.spawn import spawn

WORLD = 64


@pytest.fixture(scope="module")
def outputs():
    out = {}
    for name in ("7B_demo", "30B_demo", "internlm2_7B"):
        cfg, layout = read_config(CONFIGS / f"{name}.py", world_size=WORLD)
        files = render(cfg, layout)
        out[name] = {
            "ds": json.loads(files["ds_config.json"]),
            "mcore": yaml.safe_load(files["transformer_config.yaml"]),
            "args": files["megatron_args.txt"].splitlines(),
            "report": {f["path"]: f for f in json.loads(files["report.json"])["fields"]},
            "notes": json.loads(files["report.json"])["notes"],
            "md": files["report.md"],
        }
    return out


def test_7b_demo(outputs):
    o = outputs["7B_demo"]
    ds, tc, model = o["ds"], o["mcore"]["transformer_config"], o["mcore"]["model"]
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 1
    assert ds["train_batch_size"] == 8 * 64
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 536870912, "allgather_bucket_size": 536870912,
                                       "overlap_comm": False, "contiguous_gradients": True, "reduce_scatter": True}
    assert ds["gradient_clipping"] == 1.0
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                          "hysteresis": 2, "consecutive_hysteresis": False, "min_loss_scale": 1.0}
    assert "bf16" not in ds
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                                          "weight_decay": 0.01}}
    assert ds["scheduler"] == {"type": "WarmupCosineLR", "params": {
        "total_num_steps": 50000, "warmup_num_steps": 500, "warmup_type": "linear", "warmup_min_ratio": 0.0,
        "cos_min_ratio": pytest.approx(0.1), "last_batch_iteration": -1}}
    assert tc["num_layers"] == 32 and tc["hidden_size"] == 4096 and tc["num_attention_heads"] == 32
    assert tc["ffn_hidden_size"] == 11008 and tc["kv_channels"] == 128 and tc["num_query_groups"] == 32
    assert tc["normalization"] == "RMSNorm" and tc["layernorm_epsilon"] == 1e-5 and tc["gated_linear_unit"]
    assert tc["activation_func"] == "torch.nn.functional.silu"
    assert tc["add_qkv_bias"] is True and tc["add_bias_linear"] is False
    assert tc["hidden_dropout"] == 0 and tc["attention_dropout"] == 0
    assert tc["fp16"] is True and tc["bf16"] is False and tc["params_dtype"] == "float16"
    assert tc["tensor_model_parallel_size"] == 1 and tc["pipeline_model_parallel_size"] == 1
    assert tc["virtual_pipeline_model_parallel_size"] is None and not tc["sequence_parallel"]
    assert "recompute_granularity" not in tc
    assert model == {"family": "internlm1", "vocab_size": 103168, "max_sequence_length": 2048, "rotary_base": 10000.0,
                     "qkv_bias": True, "out_proj_bias": True, "position_embedding_type": "rope", "rotary_percent": 1.0,
                     "share_embeddings_and_output_weights": False, "parallel_output": True, "recompute_ratio": 0.0}
    for arg in ("--ffn-hidden-size 11008", "--global-batch-size 512", "--micro-batch-size 2", "--fp16",
                "--use-distributed-optimizer", "--add-qkv-bias", "--lr-warmup-iters 500", "--min-lr 1e-05"):
        assert arg in o["args"], arg
    r = o["report"]
    assert r["parallel.zero1"]["status"] == "approximate" and "88.9%" in r["parallel.zero1"]["note"]
    assert r["grad_scaler.max_scale"]["status"] == "unsupported"
    assert r["grad_scaler.growth_factor"]["status"] == "approximate"
    assert r["lr_scheduler.warmup_ratio"]["status"] == "approximate"
    assert r["adam.adam_beta2_c"]["status"] == "exact"  # c = 0: constant beta2
    assert r["ckpt.async_upload"]["status"] == "exact" and "non-object-store" in r["ckpt.async_upload"]["note"]
    assert r["model.num_layers"]["status"] == "exact"
    assert r["hybrid_zero_optimizer.overlap_sync_grad"]["status"] == "approximate"  # reduced after, not during
    assert "log" in o["notes"]["LR schedule"] and "at least 2" in o["notes"]["LR schedule"]
    # every key the seed document has is present (the restored line structure lost none)
    for key in ("ckpt.load_ckpt_folder", "ckpt.load_model_only_folder", "ckpt.load_optimizer",
                "ckpt.snapshot_ckpt_folder", "ckpt.oss_snapshot_freq", "ckpt.async_upload_tmp_folder",
                "data.valid_micro_num", "data.min_length", "hybrid_zero_optimizer.overlap_sync_param",
                "beta2_scheduler.c", "model.num_chunks", "parallel.sequence_parallel", "cudnn_benchmark"):
        assert key in r, key


def test_30b_demo(outputs):
    o = outputs["30B_demo"]
    ds, tc = o["ds"], o["mcore"]["transformer_config"]
    assert tc["ffn_hidden_size"] == 16384 and tc["num_attention_heads"] == 48 and tc["num_layers"] == 60
    assert tc["tensor_model_parallel_size"] == 4 and o["mcore"]["parallel"]["data_parallel_size"] == 16
    assert ds["train_batch_size"] == 8 * 16
    assert o["report"]["parallel.zero1"]["status"] == "exact"
    assert "--tensor-model-parallel-size 4" in o["args"] and "--global-batch-size 128" in o["args"]


def test_internlm2_7b(outputs):
    o = outputs["internlm2_7B"]
    ds, tc, model = o["ds"], o["mcore"]["transformer_config"], o["mcore"]["model"]
    assert tc["ffn_hidden_size"] == 14336 and tc["num_query_groups"] == 8 and tc["kv_channels"] == 128
    assert tc["add_qkv_bias"] is False and model["out_proj_bias"] is False and model["qkv_bias"] is False
    assert tc["bf16"] is True and tc["params_dtype"] == "bfloat16"
    assert model["family"] == "internlm2" and model["vocab_size"] == 92544 and model["rotary_base"] == 1e6
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["train_batch_size"] == 4 * 64
    assert "--group-query-attention" in o["args"] and "--num-query-groups 8" in o["args"]
    assert "--rotary-base 1e+06" in o["args"] and "--bf16" in o["args"] and "--add-qkv-bias" not in o["args"]


def test_pipeline_layout_goes_to_megatron_core():
    cfg, layout = read_config(CONFIGS / "tiny.py", world_size=2)
    mcore = yaml.safe_load(render(cfg, layout)["transformer_config.yaml"])
    tc = mcore["transformer_config"]
    assert tc["pipeline_model_parallel_layout"] == [["embedding", "decoder"], ["decoder"], ["decoder"],
                                                    ["decoder", "loss"]]
    assert tc["virtual_pipeline_model_parallel_size"] == 2
    assert tc["overlap_p2p_comm"] is True and tc["batch_p2p_comm"] is False
    assert mcore["parallel"]["layers"] == [[[0, 1], [2, 3]], [[1, 2], [3, 4]]]


def _validate_with_deepspeed(configs: dict) -> dict:
    """Inside a 1-rank process group: DeepSpeed's own config class on each ds_config.json."""
    import torch.distributed as dist

    import deepspeed.comm
    import deepspeed.ops
    from deepspeed.runtime.config import DeepSpeedConfig

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    dist.init_process_group("gloo")
    deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)

    class DataParallel:  # DeepSpeed takes the world size for its batch arithmetic from here
        def __init__(self, size):
            self.size = size

        def get_data_parallel_world_size(self):
            return self.size

    out = {}
    for name, (ds, dp) in configs.items():
        c = DeepSpeedConfig(ds, mpu=DataParallel(dp))
        out[name] = (c.train_batch_size, c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps,
                     c.zero_optimization_stage, c.gradient_clipping, c.optimizer_name, c.scheduler_name,
                     c.fp16_enabled if hasattr(c, "fp16_enabled") else c.float16_config.enabled)
    return out


@pytest.mark.multiproc
def test_deepspeed_accepts_the_configs(outputs):
    configs = {name: (o["ds"], o["mcore"]["parallel"]["data_parallel_size"]) for name, o in outputs.items()}
    checked = spawn(_validate_with_deepspeed, 1, configs)[0]
    assert checked["7B_demo"] == (512, 8, 1, 1, 1.0, "adamw", "WarmupCosineLR", True)
    assert checked["30B_demo"] == (128, 8, 1, 1, 1.0, "adamw", "WarmupCosineLR", True)
    assert checked["internlm2_7B"] == (256, 4, 1, 1, 1.0, "adamw", "WarmupCosineLR", False)
