"""A training checkpoint written on the GPU resumes on the CPU, and one written on the CPU resumes on the GPU.

Each direction: 6 steps on the first device in one go, against 3 steps there, a checkpoint, and 3 more steps
on the other device in a new process (auto-resume). The tiny config on one rank in fp32, with Adam's eps
1e-4 so that the two devices' rounding differences stay at rounding size (CPU_NOTES P8); losses and the
step-6 weights must agree to 1e-4.
"""

from __future__ import annotations

import pytest

from adapter.checkpoint.convert import compare, open_checkpoint
from tests.gpu import workers
from tests.spawn import CPU_ONLY, spawn

pytestmark = pytest.mark.gpu

ENV = {"gpu": None, "cpu": CPU_ONLY}


def _train(folder, device: str, max_steps: int | None = None) -> dict:
    return spawn(workers.train_tiny, 1, "torch.float32", 6, str(folder), max_steps, True, 1e-4,
                 {"checkpoint_every": 3}, env=ENV[device])[0]


@pytest.mark.parametrize("first, second", [("gpu", "cpu"), ("cpu", "gpu")])
def test_checkpoint_resumes_on_the_other_device(tmp_path, first, second):
    whole = _train(tmp_path / "whole", first)
    head = _train(tmp_path / "split", first, max_steps=3)
    tail = _train(tmp_path / "split", second)
    assert (whole["cuda"], head["cuda"], tail["cuda"]) == (first == "gpu", first == "gpu", second == "gpu")
    assert [r["step"] for r in head["records"]] == [1, 2, 3]
    assert [r["step"] for r in tail["records"]] == [4, 5, 6]
    split = head["records"] + tail["records"]
    assert [r["batch_count"] for r in split] == [r["batch_count"] for r in whole["records"]]
    assert [r["loss"] for r in split] == pytest.approx([r["loss"] for r in whole["records"]], rel=1e-4)
    a, b = open_checkpoint(tmp_path / "whole" / "ckpt" / "6"), open_checkpoint(tmp_path / "split" / "ckpt" / "6")
    assert compare(a, b, atol=1e-4) == []
