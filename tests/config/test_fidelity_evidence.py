"""The fidelity report claims "exact" for training behaviour only where InternEvo's own runs back it.

``fields.CHECKED_BY_INTERNEVO_RUNS`` says which training fields (and values) the InternEvo-written 8-step
runs exercise; ``tests/train/test_internevo_trajectory.py`` trains those runs' configs and matches them. Here:
the table claims nothing the fixture configs do not contain, and no report says "exact" for a training field
outside it.
"""

from __future__ import annotations

import pytest

from adapter.config import fields, read_config
from adapter.config.report import field_reports
from tests.conftest import CONFIGS, FIXTURES

RUNS = [FIXTURES / "internlm2_traj_dp1", FIXTURES / "internlm2_traj_zero2"]
ALIASES = {"parallel.zero1": "parallel.zero1.size"}  # the int form of the same field


def _run_values() -> dict[str, list]:
    """Every value the InternEvo runs' configs give or default, per dotted path."""
    out: dict[str, list] = {}
    for run in RUNS:
        cfg, _ = read_config(run / "config.py")
        assert cfg.model.dtype == "fp32"  # what Checked.fp32_only relies on
        for path, value in {**cfg.defaulted, **cfg.given}.items():
            out.setdefault(path, []).append(value)
    return out


def test_table_claims_only_what_the_runs_contain():
    values = _run_values()
    for path, checked in fields.CHECKED_BY_INTERNEVO_RUNS.items():
        used = values.get(ALIASES.get(path, path))
        assert used, f"{path}: the InternEvo runs neither give nor default it"
        for v in checked.values or ():
            assert any(fields.same_value(u, v) for u in used), f"{path}={v!r}: the InternEvo runs use {used}"
        assert fields.is_training(path), path


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.py")) + [run / "config.py" for run in RUNS],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_exact_training_rows_are_backed_by_internevo_runs(config):
    cfg, _ = read_config(config)
    for row in field_reports(cfg):
        if row.status == "exact" and fields.is_training(row.path):
            assert fields.checked_by_internevo_runs(cfg, row.path, cfg.given[row.path]), row.path


def test_the_runs_own_configs_report_their_training_rows_exact():
    """Training fields the runs set are exact, apart from what differs for reasons of its own (DeepSpeed's
    lr scheduler in ds_config.json, InternEvo's straggler diagnosis)."""
    cfg, _ = read_config(RUNS[0] / "config.py")
    rows = {r.path: r for r in field_reports(cfg) if fields.is_training(r.path)}
    others = {p for p, r in rows.items() if r.status != "exact"}
    assert others == {"lr_scheduler.total_steps", "lr_scheduler.init_steps", "lr_scheduler.warmup_ratio",
                      "lr_scheduler.eta_min", "data.empty_cache_and_diag_interval", "data.diag_outlier_ratio"}
    assert not any(fields.UNCHECKED_NOTE in rows[p].note for p in others)


def test_unexercised_values_are_not_claimed_exact(make_config):
    from tests.conftest import base_sections

    s = base_sections()
    s["model"]["dtype"] = "torch.bfloat16"
    s["loss"] = dict(label_smoothing=0.1)
    s["lr_scheduler"]["init_steps"] = 2
    s["data"]["pack_sample_into_one"] = True
    cfg, _ = read_config(make_config(s))
    rows = {r.path: r for r in field_reports(cfg)}
    for path in ("model.dtype", "loss.label_smoothing", "data.pack_sample_into_one",
                 "hybrid_zero_optimizer.clip_grad_norm"):
        assert rows[path].status == "approximate" and fields.UNCHECKED_NOTE in rows[path].note, path
    assert rows["adam.lr"].status == "exact"  # any lr: the runs exercise the formula
