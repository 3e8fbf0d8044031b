"""InternEvo's learning-rate, beta2 and loss-scale schedules, as plain functions and one small class.

DeepSpeed's own scheduler and loss scaler cannot express these exactly (see the fidelity report), so the
training loop sets ``lr`` and ``betas`` on the optimizer's param groups before each step and drives the
loss scale itself.

Step numbering: ``t`` is the number of successful updates so far (InternEvo's ``step_count``), so the
values returned for ``t`` are the ones in effect for update ``t + 1``.
"""

from __future__ import annotations

import math

from adapter.config.schema import Beta2SchedulerConfig, GradScalerConfig, LRSchedulerConfig


def learning_rate(t: int, base_lr: float, cfg: LRSchedulerConfig) -> float:
    """``FineTuneCosineAnnealingWarmupLR``: 0 for ``init_steps``, linear warmup, then cosine to ``eta_min``.

    ``lr = base * (t + 1 - init) / warmup`` during warmup, then
    ``eta_min + (base - eta_min) * (1 + cos(pi * k / T_max)) / 2`` with ``k = t - (init + warmup)`` and
    ``T_max = total - init - warmup`` (periodic after ``total``, as InternEvo's is).

    This is what InternEvo 0.5.2 gives on the torch it was written for (<= 2.7). InternEvo's WarmupScheduler
    calls the cosine's ``CosineAnnealingLR.get_lr()`` at the hand-over while its ``last_epoch`` is 0; torch
    <= 2.7 returns the current lr there, torch >= 2.8 (``_is_initial``) applies the chained formula, which
    multiplies every value of the first cosine period (up to ``total_steps``) above ``eta_min`` by
    ``2 / (1 + cos(pi / T_max))`` (1.0718 for T_max = 6); the periodic values after it are unscaled.
    ``tests/train/test_internevo_trajectory.py`` pins this form to InternEvo's own runs (their generator
    restored the <= 2.7 branch and checked it against torch 2.7.1's scheduler).
    """
    warmup = int(cfg.total_steps * cfg.warmup_ratio)
    if t < cfg.init_steps:
        return 0.0
    if t < cfg.init_steps + warmup:
        return base_lr * (t + 1 - cfg.init_steps) / warmup
    t_max = cfg.total_steps - cfg.init_steps - warmup
    if t_max <= 0:
        return base_lr
    k = t - cfg.init_steps - warmup
    return cfg.eta_min + (base_lr - cfg.eta_min) * (1 + math.cos(math.pi * k / t_max)) / 2


def beta2(t: int, initial_beta2: float, cfg: Beta2SchedulerConfig) -> float:
    """beta2 for update ``t + 1``: the optimizer's own value first, then ``max(init_beta2, 1 - t**-c)``.

    InternEvo's ``Beta2Scheduler`` is stepped after each successful update, so update 1 uses
    ``adam.adam_beta2`` and update ``t + 1`` (t >= 1) uses the scheduler's value for ``cur_iter = t``.
    It is not checkpointed; InternEvo restarts ``cur_iter`` at every launch, we count from the run's steps.
    """
    if t == 0:
        return initial_beta2
    if cfg.c <= 0:
        return cfg.init_beta2
    return max(cfg.init_beta2, 1 - 1 / t ** cfg.c)


class LossScaler:
    """InternEvo's ``DynamicGradScaler`` (``solver/optimizer/utils.py``).

    On overflow the hysteresis counter grows and, once it reaches ``hysteresis``, every further overflow
    multiplies the scale by ``backoff_factor`` (not below ``min_scale``); the counter is reset only when the
    scale grows. After ``growth_interval`` overflow-free steps the scale is multiplied by ``growth_factor``
    (not above ``max_scale``). ``state_dict`` has InternEvo's keys.
    """

    def __init__(self, cfg: GradScalerConfig, enabled: bool = True):
        self.cfg = cfg
        self.scale = float(cfg.initial_scale) if enabled else 1.0
        self.enabled = enabled
        self.growth_step = 0
        self.hysteresis_step = 0

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        cfg = self.cfg
        if overflow:
            self.hysteresis_step += 1
            self.growth_step = 0
            if self.hysteresis_step >= cfg.hysteresis:
                self.scale = self.scale * cfg.backoff_factor
                if cfg.min_scale:
                    self.scale = max(self.scale, float(cfg.min_scale))
        else:
            self.growth_step += 1
            if self.growth_step == cfg.growth_interval:
                self.growth_step = 0
                self.hysteresis_step = 0
                self.scale = self.scale * cfg.growth_factor
                if cfg.max_scale:
                    self.scale = min(self.scale, float(cfg.max_scale))

    def state_dict(self) -> dict:
        return {"_scale": self.scale, "_growth_step": self.growth_step, "_hysteresis_step": self.hysteresis_step}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["_scale"])
        self.growth_step = int(state["_growth_step"])
        self.hysteresis_step = int(state["_hysteresis_step"])
