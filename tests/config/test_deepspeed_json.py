"""The DeepSpeed JSON over random non-default configs: every field the translator emits must carry the
config's own value, computed here from InternEvo's keys and DeepSpeed's documented meaning of each field.

The golden tests pin the shipped configs, where most of these fields keep their defaults (``init_steps=0``,
``last_epoch=-1``, ``min_scale=1``, a power-of-two ``initial_scale``), so a hard-coded default passes them.
Here every value is drawn away from its default.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from adapter.config import RawConfig, normalize, validate
from adapter.config.to_deepspeed import deepspeed_config
from tests.conftest import base_sections

DTYPES = {"fp16": "torch.float16", "bf16": "torch.bfloat16", "fp32": "torch.float32"}


@st.composite
def configs(draw) -> tuple[dict, str, int]:
    """InternEvo sections with every field the DeepSpeed JSON carries off its default, the dtype and the
    number of processes (tensor = pipeline = 1, so data parallel is the world size)."""
    s = base_sections()
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    s["model"]["dtype"] = DTYPES[dtype]
    s["data"].update(micro_num=draw(st.integers(1, 8)), micro_bsz=draw(st.integers(1, 8)),
                     total_steps=draw(st.integers(1, 500)))
    lr = draw(st.floats(1e-6, 1e-2))
    s["adam"].update(lr=lr, adam_beta1=draw(st.floats(0.5, 0.99)), adam_beta2=draw(st.floats(0.9, 0.999)),
                     adam_eps=draw(st.floats(1e-10, 1e-5)), weight_decay=draw(st.floats(0.0, 0.3)))
    total = draw(st.integers(3, 1000))
    s["lr_scheduler"] = dict(total_steps=total, init_steps=draw(st.integers(0, 50)),
                             warmup_ratio=draw(st.floats(0.0, 0.5)), eta_min=lr * draw(st.floats(0.0, 0.5)),
                             last_epoch=draw(st.integers(-1, 100)))
    s["beta2_scheduler"] = dict(init_beta2=draw(st.floats(0.9, 0.999)), c=0, cur_iter=-1)
    # initial_scale anywhere between powers of two: the power is the nearest one on a log scale
    s["grad_scaler"] = dict(fp16=dict(initial_scale=2.0 ** draw(st.floats(5.0, 24.0)),
                                      min_scale=draw(st.sampled_from([0.25, 2.0, 4.0, 16.0])),
                                      growth_interval=draw(st.integers(1, 5000))),
                            hysteresis=draw(st.integers(1, 10)))
    s["hybrid_zero_optimizer"].update(reduce_bucket_size=draw(st.integers(1, 10**9)),
                                      clip_grad_norm=draw(st.floats(0.1, 10.0)))
    return s, dtype, draw(st.integers(1, 8))


@settings(max_examples=60, deadline=None)
@given(configs())
def test_every_emitted_field_carries_the_config(case):
    s, dtype, world = case
    cfg = normalize(RawConfig(s, "random.py", {}))
    ds = deepspeed_config(cfg, validate(cfg, world))
    d, adam, lr, zo = s["data"], s["adam"], s["lr_scheduler"], s["hybrid_zero_optimizer"]

    rows = d["micro_num"] * d["micro_bsz"]  # sequences per rank per step; DeepSpeed sees one step-sized batch
    assert ds["train_micro_batch_size_per_gpu"] == rows
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["train_batch_size"] == rows * world
    # InternEvo 0.5.2 clips only in fp16/bf16
    assert ds["gradient_clipping"] == (0 if dtype == "fp32" else zo["clip_grad_norm"])
    zero = ds["zero_optimization"]
    assert zero["stage"] == 1
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == zo["reduce_bucket_size"]

    assert ("fp16" in ds) == (dtype == "fp16") and ("bf16" in ds) == (dtype == "bf16")
    if dtype == "fp16":
        scaler = s["grad_scaler"]
        fp16 = ds["fp16"]
        assert fp16["enabled"] is True and fp16["loss_scale"] == 0  # 0 = dynamic
        power = math.log2(scaler["fp16"]["initial_scale"])
        assert abs(fp16["initial_scale_power"] - power) <= 0.5
        assert fp16["loss_scale_window"] == scaler["fp16"]["growth_interval"]
        assert fp16["hysteresis"] == scaler["hysteresis"]
        assert fp16["min_loss_scale"] == scaler["fp16"]["min_scale"]
    if dtype == "bf16":
        assert ds["bf16"] == {"enabled": True}

    params = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "AdamW"
    assert params["lr"] == adam["lr"] and params["eps"] == adam["adam_eps"]
    assert params["weight_decay"] == adam["weight_decay"]
    assert params["betas"] == [adam["adam_beta1"], s["beta2_scheduler"]["init_beta2"]]

    sched = ds["scheduler"]["params"]
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    assert sched["total_num_steps"] == lr["total_steps"]
    # init_steps (lr held at 0) is folded into the ramp; DeepSpeed refuses fewer than 2 warm-up steps
    assert sched["warmup_num_steps"] == max(2, lr["init_steps"] + int(lr["total_steps"] * lr["warmup_ratio"]))
    assert sched["warmup_min_ratio"] == 0.0
    assert math.isclose(sched["cos_min_ratio"], lr["eta_min"] / adam["lr"], rel_tol=1e-12, abs_tol=1e-15)
    assert sched["last_batch_iteration"] == lr["last_epoch"]
    assert ds["steps_per_print"] > d["total_steps"]  # the training loop prints, DeepSpeed stays quiet


def test_initial_scale_power_rounds_on_a_log_scale():
    """1.5 * 2**15 is nearer 2**16 than 2**15 on a log scale (log2 = 15.58); 1.3 * 2**15 is nearer 2**15."""
    for scale, power in [(1.5 * 2**15, 16), (1.3 * 2**15, 15), (2.0**16, 16), (3.0, 2)]:
        s = base_sections()
        s["model"]["dtype"] = "torch.float16"
        s["grad_scaler"] = dict(fp16=dict(initial_scale=scale))
        cfg = normalize(RawConfig(s, "scale.py", {}))
        assert deepspeed_config(cfg, validate(cfg, 1))["fp16"]["initial_scale_power"] == power, scale
