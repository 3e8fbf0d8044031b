"""InternEvo's schedules against the values InternEvo itself produced (fixtures' lr_schedule.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from adapter.config import read_config
from adapter.config.schema import GradScalerConfig
from adapter.train.schedules import LossScaler, beta2, learning_rate

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "internevo"


@pytest.mark.parametrize("family", ["internlm1", "internlm2"])
def test_lr_schedule_against_internevo(family):
    fixture = json.loads((FIXTURES / f"{family}_tiny" / "lr_schedule.json").read_text())
    cfg, _ = read_config(FIXTURES / f"{family}_tiny" / "config.py")
    lrs = fixture["lrs"]
    sched, base = cfg.lr_scheduler, cfg.adam.lr
    ours = [learning_rate(t, base, sched) for t in range(len(lrs))]
    warmup = sched.init_steps + sched.warmup_steps
    t_max = sched.total_steps - warmup
    # warmup and everything from total_steps on: identical
    for t in list(range(warmup)) + list(range(sched.total_steps, len(lrs))):
        assert ours[t] == pytest.approx(lrs[t], rel=1e-12), t
    # cosine part: these fixtures ran InternEvo on unpatched torch 2.13, whose CosineAnnealingLR (>= 2.8) scales
    # (lr - eta_min) by 2 / (1 + cos(pi / T_max)); we follow InternEvo on its own torch (<= 2.7), which the
    # internlm2_traj_* runs pin exactly (test_internevo_trajectory.py)
    factor = 2 / (1 + math.cos(math.pi / t_max))
    for t in range(warmup, sched.total_steps):
        assert lrs[t] - sched.eta_min == pytest.approx(factor * (ours[t] - sched.eta_min), rel=1e-9), t
    assert ours[warmup] == pytest.approx(base) and ours[sched.total_steps] == pytest.approx(sched.eta_min)
    assert fixture["lrs_seen_in_the_two_real_training_steps"] == pytest.approx(ours[:2])


def test_lr_init_steps_hold_zero():
    cfg, _ = read_config(FIXTURES / "internlm1_tiny" / "config.py")
    import dataclasses

    sched = dataclasses.replace(cfg.lr_scheduler, init_steps=3)
    values = [learning_rate(t, 1.0, sched) for t in range(6)]
    assert values[:3] == [0, 0, 0] and values[3] == pytest.approx(1 / sched.warmup_steps)


def test_beta2_against_internevo():
    fixture = json.loads((FIXTURES / "internlm1_tiny" / "lr_schedule.json").read_text())["beta2_scheduler"]
    cfg, _ = read_config(FIXTURES / "internlm1_tiny" / "config.py")
    import dataclasses

    for init, values in fixture["values_by_init_beta2"].items():
        sched = dataclasses.replace(cfg.beta2_scheduler, init_beta2=float(init), c=fixture["c"])
        # values[i] is betas[1] after the (i+1)-th scheduler step, i.e. in effect for update i + 2
        ours = [beta2(i + 1, 0.123, sched) for i in range(len(values))]
        assert ours == pytest.approx(values, rel=1e-12)
        assert beta2(0, 0.123, sched) == 0.123  # the first update uses the optimizer's own beta2


def _scaler(**overrides) -> LossScaler:
    base = dict(initial_scale=2.0**16, min_scale=1.0, growth_interval=3, growth_factor=2.0, backoff_factor=0.5,
                max_scale=2.0**17, hysteresis=2)
    base.update(overrides)
    return LossScaler(GradScalerConfig(**base))


def test_loss_scaler_follows_internevo_rules():
    s = _scaler()
    trace = []
    for overflow in [True, True, True, False, False, False, False, False, False, True]:
        s.update(overflow)
        trace.append((s.scale, s.growth_step, s.hysteresis_step))
    assert trace == [
        (2.0**16, 0, 1),  # first overflow: hysteresis absorbs it
        (2.0**15, 0, 2),  # second: back off
        (2.0**14, 0, 3),  # the counter is not reset by a backoff: every further overflow backs off
        (2.0**14, 1, 3), (2.0**14, 2, 3),
        (2.0**15, 0, 0),  # growth_interval clean steps: grow, reset both counters
        (2.0**15, 1, 0), (2.0**15, 2, 0),
        (2.0**16, 0, 0),
        (2.0**16, 0, 1),
    ]
    assert s.state_dict() == {"_scale": 2.0**16, "_growth_step": 0, "_hysteresis_step": 1}


def test_loss_scaler_clamps_and_restores():
    s = _scaler(initial_scale=2.0, hysteresis=1)
    for _ in range(3):
        s.update(True)
    assert s.scale == 1.0  # clamped at min_scale (DeepSpeed would raise here)
    s = _scaler(initial_scale=2.0**17)
    for _ in range(3):
        s.update(False)
    assert s.scale == 2.0**17  # clamped at max_scale
    t = _scaler()
    t.load_state_dict({"_scale": 8.0, "_growth_step": 2, "_hysteresis_step": 1})
    t.update(False)
    assert t.state_dict() == {"_scale": 16.0, "_growth_step": 0, "_hysteresis_step": 0}
    off = LossScaler(GradScalerConfig(initial_scale=2.0**16, min_scale=1.0, growth_interval=1, growth_factor=2.0,
                                      backoff_factor=0.5, max_scale=2.0**24, hysteresis=2), enabled=False)
    off.update(False)
    assert off.scale == 1.0
