"""Gradient clipping as InternEvo 0.5.2 applies it, in every output of the translator.

InternEvo's ``HybridZeroOptimizer._step`` unscales and clips only ``if gpc.config.model.dtype is not
torch.float32`` (``torch.tf32`` is float32 too): fp32 runs report the norm but give AdamW the unclipped
gradient (measured in ``tests/fixtures/internevo/internlm2_traj_*``). ``adapter.clip_grad_in_fp32=True``
clips anyway.
"""

from __future__ import annotations

import json

import pytest

from adapter.config import RawConfig, normalize, validate
from adapter.config.convert import render
from adapter.config.report import field_reports
from tests.conftest import base_sections


def _outputs(dtype: str, clip: float = 0.5, opt_in: bool | None = None):
    s = base_sections()
    s["model"]["dtype"] = dtype
    s["hybrid_zero_optimizer"]["clip_grad_norm"] = clip
    if opt_in is not None:
        s["adapter"] = dict(clip_grad_in_fp32=opt_in)
    cfg = normalize(RawConfig(s, "clip.py", {}))
    layout = validate(cfg, 1)
    files = render(cfg, layout)
    report = {f.path: f for f in field_reports(cfg)}
    return json.loads(files["ds_config.json"]), files["megatron_args.txt"].splitlines(), report, cfg


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.tf32"])
def test_fp32_does_not_clip_by_default(dtype):
    ds, args, report, cfg = _outputs(dtype)
    assert ds["gradient_clipping"] == 0.0
    assert "--clip-grad 0" in args
    row = report["hybrid_zero_optimizer.clip_grad_norm"]
    assert row.status == "exact" and "does not clip in fp32" in row.note and "clip_grad_in_fp32" in row.note
    assert "adapter.clip_grad_in_fp32" not in cfg.defaulted  # not an InternEvo key: no InternEvo default


@pytest.mark.parametrize("dtype", ["torch.bfloat16", "torch.float16"])
def test_half_precision_clips_at_the_configured_norm(dtype):
    ds, args, report, _ = _outputs(dtype, clip=0.5)
    assert ds["gradient_clipping"] == 0.5
    assert "--clip-grad 0.5" in args
    row = report["hybrid_zero_optimizer.clip_grad_norm"]
    # clipped as InternEvo's source says, but InternEvo's own runs (fp32) never clip: not claimed exact
    assert row.status == "approximate" and "no InternEvo-written run" in row.note and "clips" in row.note


def test_opt_in_clips_fp32_and_says_it_differs_from_internevo():
    ds, args, report, _ = _outputs("torch.float32", clip=0.25, opt_in=True)
    assert ds["gradient_clipping"] == 0.25 and "--clip-grad 0.25" in args
    assert report["hybrid_zero_optimizer.clip_grad_norm"].status == "approximate"
    assert report["adapter.clip_grad_in_fp32"].status == "approximate"
    ds, _, report, _ = _outputs("torch.bfloat16", clip=0.25, opt_in=True)
    assert ds["gradient_clipping"] == 0.25 and report["adapter.clip_grad_in_fp32"].status == "exact"


def test_option_is_type_checked():
    from adapter.config import ConfigError

    with pytest.raises(ConfigError, match="adapter.clip_grad_in_fp32"):
        _outputs("torch.float32", opt_in="yes")  # type: ignore[arg-type]
