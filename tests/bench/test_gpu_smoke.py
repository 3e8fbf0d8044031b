"""``bench/gpu.sh --cpu-smoke``: the GPU benchmark's whole path (both setups, timing, memory, table, files) at
tiny sizes on the CPU, so that the script a GPU machine runs cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.multiproc
def test_cpu_smoke_runs_both_setups_end_to_end(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--cpu-smoke", "--peak-tflops", "1",
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "gpu.md").read_text()
    assert table in done.stdout
    run = json.loads((tmp_path / "gpu.json").read_text())
    adapter, megatron = run["results"]
    assert adapter["setup"].startswith("adapter") and megatron["setup"].startswith("megatron-core")
    assert "DistributedOptimizer" in megatron["optimizer"] and run["world"] == 2
    # same weights and data: the first step's loss (before any update) is the same in both setups
    assert adapter["losses"][0] == pytest.approx(megatron["losses"][0], rel=1e-6)
    assert adapter["losses"][-1] == pytest.approx(megatron["losses"][-1], rel=1e-3)
    for r in (adapter, megatron):
        assert len(r["step_s_all"]) == run["sizes"]["steps"] and r["tokens_per_s"] > 0
        assert f"{r['tflops_per_device']:.3g} | {r['tflops_per_device'] / 1:.1%}" in table  # MFU with the peak given
