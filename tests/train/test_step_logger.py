"""The training loop's per-step output: ``metrics.jsonl`` at full precision, TensorBoard optional."""

from __future__ import annotations

import json
import sys
import warnings

from adapter.config import read_config
from adapter.train.loop import METRICS_FILE, RunOptions, StepLogger
from tests.conftest import CONFIGS

RECORD = {"step": 3, "batch_count": 2, "loss": 5.123456789012345, "lr": 0.00751769145362, "beta2": 0.95,
          "grad_norm": float("nan"), "loss_scale": 1.0, "skipped": False, "tokens": 128,
          "tokens_per_s": 1000.0, "tflops": 0.001}


def test_training_logs_without_tensorboard(tmp_path, monkeypatch):
    """``enable_tb`` defaults to true while tensorboard is an optional dependency: without it, one warning
    and the run goes on, metrics still written."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    cfg, _ = read_config(CONFIGS / "tiny.py")
    assert cfg.enable_tb
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = StepLogger(cfg, RunOptions(run_dir=str(tmp_path)), 0)
        logger.log(RECORD)
        logger.log({**RECORD, "step": 4})
        logger.close()
    assert [str(w.message) for w in caught if "tensorboard" in str(w.message)] == [
        f"enable_tb is set but tensorboard is not installed (pip install tensorboard): no TensorBoard logs; "
        f"the metrics are in {tmp_path / METRICS_FILE}"]
    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in lines] == [3, 4]
    assert lines[0]["loss"] == RECORD["loss"] and lines[0]["lr"] == RECORD["lr"]  # every digit
    assert lines[0]["grad_norm"] is None  # strict JSON: nan becomes null
    assert not (tmp_path / "tensorboard").exists()


def test_metrics_file_is_appended_across_launches(tmp_path):
    cfg, _ = read_config(CONFIGS / "tiny.py")
    for step in (1, 2):
        logger = StepLogger(cfg, RunOptions(run_dir=str(tmp_path)), step - 1)
        logger.log({**RECORD, "step": step})
        logger.close()
    assert [json.loads(x)["step"] for x in (tmp_path / METRICS_FILE).read_text().splitlines()] == [1, 2]
    assert any((tmp_path / "tensorboard").iterdir())  # tensorboard is installed here: it logs too
