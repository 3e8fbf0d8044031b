"""The schedules over random configs, against closed forms written here from InternEvo 0.5.2's sources.

The fixtures cover one point each (``init_steps=0``, an integer warm-up, ``c=0.8``, ``growth_interval`` never
reached after an overflow), so these draw the rest:

* lr (``FineTuneCosineAnnealingWarmupLR``): ``warmup = int(total * ratio)``; 0 while ``t < init``; then
  ``base * (t + 1 - init) / warmup``; then the cosine over ``T = total - init - warmup`` from position
  ``t - init - warmup``. With ``T <= 0`` no decay is left: the lr stays at the peak the warm-up reached.
* beta2 (``Beta2Scheduler.get_beta2``): ``init_beta2`` when ``c <= 0``, else ``max(init_beta2, 1 - 1/t**c)``;
  the first update uses the optimizer's own beta2 (the scheduler is stepped after each update).
* loss scale (``DynamicGradScaler.update``): counted from the overflow pattern, not replayed step by step.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter.config.schema import Beta2SchedulerConfig, GradScalerConfig, LRSchedulerConfig
from adapter.train.schedules import LossScaler, beta2, learning_rate


def closed_form_lr(t: int, base: float, total: int, init: int, ratio: float, eta_min: float) -> float:
    warmup = math.floor(total * ratio)
    if t < init:
        return 0.0
    if t - init < warmup:
        return base * (t - init + 1) / warmup
    decay = total - init - warmup
    if decay <= 0:
        return base
    position = t - init - warmup
    return eta_min + 0.5 * (base - eta_min) * (1 + math.cos(math.pi * position / decay))


@settings(max_examples=300, deadline=None)
@given(total=st.integers(1, 400), init=st.integers(0, 60), ratio=st.floats(0.0, 1.0),
       floor=st.floats(0.0, 1.0), base=st.floats(1e-6, 1.0), data=st.data())
def test_lr_matches_the_closed_form(total, init, ratio, floor, base, data):
    cfg = LRSchedulerConfig(total_steps=total, init_steps=init, warmup_ratio=ratio, eta_min=base * floor,
                            last_epoch=-1)
    t = data.draw(st.integers(0, total + init + 5), label="t")
    expected = closed_form_lr(t, base, total, init, ratio, base * floor)
    assert learning_rate(t, base, cfg) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_lr_worked_example_with_init_steps():
    """total 20, init 4, ratio 0.25: warm-up 5 steps (t = 4..8), cosine over 11 steps from t = 9."""
    cfg = LRSchedulerConfig(total_steps=20, init_steps=4, warmup_ratio=0.25, eta_min=0.1, last_epoch=-1)
    values = [learning_rate(t, 1.0, cfg) for t in range(21)]
    assert values[:4] == [0.0] * 4
    assert values[4:9] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert values[9] == pytest.approx(1.0)
    assert values[9 + 11] == pytest.approx(0.1)  # the floor, T = 11 steps after the hand-over
    assert values[9 + 11 // 2] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 5 / 11)) / 2)


def test_lr_without_decay_left_stays_at_the_peak():
    """Warm-up to the last step (ratio 1): nothing is left to decay, the lr stays at the base lr."""
    cfg = LRSchedulerConfig(total_steps=8, init_steps=2, warmup_ratio=0.75, eta_min=0.01, last_epoch=-1)
    assert [learning_rate(t, 2.0, cfg) for t in range(2, 12)] == pytest.approx(
        [1/3, 2/3, 1.0, 4/3, 5/3, 2.0, 2.0, 2.0, 2.0, 2.0])


def test_fractional_warmup_is_floored():
    """int(10 * 0.25) = 2 warm-up steps, not 3: the second step already has the full lr."""
    cfg = LRSchedulerConfig(total_steps=10, init_steps=0, warmup_ratio=0.25, eta_min=0.0, last_epoch=-1)
    assert [learning_rate(t, 1.0, cfg) for t in range(3)] == pytest.approx([0.5, 1.0, 1.0])


@settings(max_examples=200, deadline=None)
@given(t=st.integers(0, 10**6), own=st.floats(0.5, 0.999), init=st.floats(0.5, 0.999),
       c=st.one_of(st.just(0.0), st.floats(-2.0, 0.0), st.floats(0.01, 2.0)))
def test_beta2_matches_internevo(t, own, init, c):
    cfg = Beta2SchedulerConfig(init_beta2=init, c=c, cur_iter=-1)
    if t == 0:
        expected = own
    elif c <= 0:
        expected = init
    else:
        expected = max(init, 1 - 1 / t**c)
    assert beta2(t, own, cfg) == pytest.approx(expected, rel=1e-12)


def test_beta2_without_decay_is_the_schedulers_value():
    """c = 0 with init_beta2 0.98 and adam_beta2 0.95: updates 2, 3, … use 0.98, not the optimizer's 0.95."""
    cfg = Beta2SchedulerConfig(init_beta2=0.98, c=0.0, cur_iter=-1)
    assert [beta2(t, 0.95, cfg) for t in range(4)] == [0.95, 0.98, 0.98, 0.98]


def expected_scale(pattern: list[bool], initial: float, growth: float, backoff: float, interval: int,
                   hysteresis: int) -> float:
    """The scale after ``pattern`` (True: overflow), unclamped: a growth after every ``interval`` clean steps
    in a row (a run restarts at an overflow and at a growth), a backoff at every overflow that is at least
    the ``hysteresis``-th since the last growth."""
    growths = backoffs = 0
    run = overflows = 0
    for overflow in pattern:
        if overflow:
            run = 0
            overflows += 1
            backoffs += overflows >= hysteresis
        else:
            run += 1
            if run == interval:
                growths, run, overflows = growths + 1, 0, 0
    return initial * growth**growths * backoff**backoffs


@settings(max_examples=200, deadline=None)
@given(pattern=st.lists(st.booleans(), max_size=40), growth=st.floats(1.1, 4.0), backoff=st.floats(0.1, 0.9),
       interval=st.integers(1, 6), hysteresis=st.integers(1, 4))
def test_loss_scale_follows_the_overflow_pattern(pattern, growth, backoff, interval, hysteresis):
    cfg = GradScalerConfig(initial_scale=2.0**16, min_scale=0.0, growth_interval=interval, growth_factor=growth,
                           backoff_factor=backoff, max_scale=0.0, hysteresis=hysteresis)
    scaler = LossScaler(cfg)
    for overflow in pattern:
        scaler.update(overflow)
    assert scaler.scale == pytest.approx(expected_scale(pattern, 2.0**16, growth, backoff, interval, hysteresis),
                                         rel=1e-9)


def test_an_overflow_restarts_the_growth_count():
    """clean, clean, overflow, clean with growth_interval 3: three clean steps, but not in a row: no growth."""
    cfg = GradScalerConfig(initial_scale=1024.0, min_scale=1.0, growth_interval=3, growth_factor=2.0,
                           backoff_factor=0.5, max_scale=2.0**24, hysteresis=2)
    scaler = LossScaler(cfg)
    for overflow in [False, False, True, False]:
        scaler.update(overflow)
    assert scaler.scale == 1024.0
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 2048.0


def test_scale_is_clamped_and_disabled_scaler_is_one():
    cfg = GradScalerConfig(initial_scale=8.0, min_scale=3.0, growth_interval=1, growth_factor=4.0,
                           backoff_factor=0.25, max_scale=20.0, hysteresis=1)
    scaler = LossScaler(cfg)
    scaler.update(True)
    assert scaler.scale == 3.0  # 8 * 0.25 = 2, clamped up to min_scale
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 20.0  # 3 * 4 = 12, then 48 clamped down to max_scale
    off = LossScaler(cfg, enabled=False)
    off.update(True)
    assert off.scale == 1.0
