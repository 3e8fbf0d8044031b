"""Training with DeepSpeed ZeRO-1 over megatron-core's schedule against a plain single-process loop.

The reference is one process, no DeepSpeed: the tp=1 model, ``torch.optim.AdamW`` and
``clip_grad_norm_``, with InternEvo's lr/beta2 schedule. Every layout sees the same global batch per step
(8 packed micro-batches, split over data-parallel ranks) and starts from the same weights; after 5 steps
the per-step losses and the final weights must agree. Adam's eps is 1e-4 in these runs: with 1e-8, Adam
turns tensor-parallel rounding noise (1e-7) into update noise of order lr (CPU_NOTES P8).
"""

from __future__ import annotations

import pytest
import torch

from tests.spawn import spawn
from tests.train import workers

RTOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def single():
    return spawn(workers.single_process_suite, 1)[0]


@pytest.fixture(scope="module")
def two():
    return spawn(workers.two_rank_suite, 2)[0]


@pytest.fixture(scope="module")
def four():
    return spawn(workers.train_matrix, 4, "internlm1", ["dp2_pp2"])[0]


def _compare(got: dict, ref: dict, rtol: float) -> None:
    assert len(got["steps"]) == len(ref["steps"]) == workers.STEPS
    for (loss, norm, lr, skipped), (rloss, rnorm, rlr, _) in zip(got["steps"], ref["steps"]):
        assert not skipped and lr == rlr
        assert abs(loss - rloss) / rloss <= rtol
        assert abs(norm - rnorm) / rnorm <= max(rtol, 1e-5)
    assert got["weights"].keys() == ref["weights"].keys()
    for name, w in ref["weights"].items():
        assert rel(got["weights"][name], w) <= rtol, name


@pytest.mark.multiproc
def test_dp1_matches_reference(single):
    _compare(single["dp1"], single["reference"]["internlm1"], RTOL)
    # the run moved the weights: a no-op optimizer would fail the comparison above only by luck
    assert single["reference"]["internlm1"]["steps"][0][1] > 0


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", ["dp2", "dp2_recompute", "tp2_sp", "pp2_vpp2"])
def test_two_rank_layouts_match_reference(single, two, layout):
    _compare(two[("internlm1", layout)], single["reference"]["internlm1"], RTOL)


@pytest.mark.multiproc
def test_internlm2_tensor_parallel_matches_reference(single, two):
    _compare(two[("internlm2", "tp2_sp")], single["reference"]["internlm2"], RTOL)


@pytest.mark.multiproc
def test_llama2_pipeline_matches_reference(single, two):
    """InternEvo's LLAMA2 (separate wq/wk/wv in its files, GQA with biases) trains like the others."""
    _compare(two[("llama2", "pp2_vpp2")], single["reference"]["llama2"], RTOL)


@pytest.mark.multiproc
def test_dp2_pp2_matches_reference(single, four):
    _compare(four["dp2_pp2"], single["reference"]["internlm1"], RTOL)


@pytest.mark.multiproc
def test_bf16_stays_close_to_fp32(single, two):
    got, ref = two[("internlm1", "dp2_bf16")], single["reference"]["internlm1"]
    for (loss, *_), (rloss, *_) in zip(got["steps"], ref["steps"]):
        assert abs(loss - rloss) / rloss <= 2e-2
    assert max(rel(got["weights"][n], w) for n, w in ref["weights"].items()) <= 0.1


@pytest.mark.multiproc
def test_gradient_accumulation_equals_one_big_microbatch(single):
    four, one = single["accumulation"]["four"], single["accumulation"]["one"]
    assert four["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert four["norm"] == pytest.approx(one["norm"], rel=1e-5)
    for name, w in one["weights"].items():
        assert rel(four["weights"][name], w) <= RTOL, name


@pytest.mark.multiproc
def test_fp16_overflow_skips_steps_and_follows_internevo_scaler():
    """fp16 (DeepSpeed's CPU accelerator forced to accept it: test-only) with a loss scale of 2**24.

    InternEvo's rules with hysteresis 2 and growth_interval 3: the first overflow is absorbed, every further
    one halves the scale; after 3 clean steps the scale doubles and both counters reset. Skipped steps do not
    advance the step count, so the learning rate waits too."""
    trace = spawn(workers.fp16_overflow_run, 1, 12)[0]["trace"]
    scales = [t[0] for t in trace]
    skipped = [t[1] for t in trace]
    assert scales == [2.0**24, 2.0**24, 2.0**23, 2.0**22, 2.0**21, 2.0**20, 2.0**20, 2.0**20, 2.0**21, 2.0**21,
                      2.0**20, 2.0**20]
    assert skipped == [True] * 5 + [False] * 3 + [True] * 2 + [False] * 2
    assert [t[3] for t in trace] == [0, 0, 0, 0, 0, 1, 2, 3, 3, 3, 4, 5]
    assert [t[2] for t in trace[:6]] == [trace[0][2]] * 6  # lr frozen while nothing is applied
    assert all(3 < t[4] < 7 for t in trace)  # finite losses throughout
