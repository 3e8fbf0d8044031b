"""``bench/ckpt_state.py`` end to end at toy sizes (two layouts, one repeat), so that the checkpoint benchmark
cannot rot: every phase is timed, the loads are checked against the saved state inside the bench, the page
cache is really dropped before each load, and the table lands in the results file."""

from __future__ import annotations

import json

import pytest

from bench import ckpt_state


@pytest.mark.multiproc
@pytest.mark.slow
def test_bench_runs_every_phase_at_toy_sizes(tmp_path):
    result = ckpt_state.main(["--layouts", "dp2,pp2", "--hidden", "64", "--layers", "2", "--vocab", "256",
                              "--seq", "32", "--repeats", "1", "--out", str(tmp_path)])
    table = (tmp_path / "ckpt_state.md").read_text()
    assert json.loads((tmp_path / "ckpt_state.json").read_text())["sizes"]["hidden"] == 64
    same, reverse = result["summary"][:2], result["summary"][2]
    for phases in same:
        assert set(phases) == {"ours_save", "ds_save", "ours_load", "ds_load"} | (
            {"ours_reshard", "read_once", "ours_weights", "read_model"} if phases is same[1] else set())
        assert phases["ours_save"]["bytes"] > 0 and phases["ds_save"]["bytes"] > 0
        assert phases["ours_save"]["ratio"] > 0 and phases["ours_load"]["ratio"] > 0
    assert set(reverse) == {"ours_reshard", "read_once", "ours_weights", "read_model"}
    assert reverse["ours_reshard"]["ratio"] > 0 and reverse["ours_weights"]["ratio"] > 0
    assert 0 < reverse["read_model"]["bytes"] < reverse["read_once"]["bytes"]
    assert max(v["cached"] for s in result["summary"] for v in s.values()) < 0.01  # loads start cold
    # the save holds the state once or twice, not once per parameter (pickled views of DeepSpeed's flat
    # buffer once made it tens of times the checkpoint)
    assert same[0]["ours_save"]["extra"] < 8 * same[0]["ours_save"]["bytes"] + 64 * 2**20
    assert table.count("| dp2 |") == 4 and "| dp2 → pp2 |" in table and "| pp2 → dp2 |" in table
