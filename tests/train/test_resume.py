"""Training checkpoints: exact resume across process restarts, incomplete folders, weights-only loading."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch

from adapter.checkpoint.convert import compare, open_checkpoint
from adapter.checkpoint.save import latest_checkpoint
from adapter.config import RawConfig, normalize, validate
from tests.conftest import REPO, base_sections
from tests.spawn import spawn


def _config(save: str, **ckpt):
    s = base_sections()
    s["model"].update(num_layers=4, num_chunks=2, vocab_size=264)
    s["data"].update(seq_len=32, micro_bsz=2, micro_num=4, total_steps=6, train_folder=str(REPO / "launch/data/tiny"))
    s["adam"].update(lr=3e-3)
    s["parallel"] = dict(zero1=-1, tensor=1, pipeline=dict(size=2, interleaved_overlap=True))
    s["ckpt"] = {**dict(enable_save_ckpt=True, save_ckpt_folder=f"local:{save}", checkpoint_every=3,
                        oss_snapshot_freq=0, auto_resume=True), **ckpt}
    s["enable_tb"] = False
    cfg = normalize(RawConfig(s, "resume.py", {}))
    return cfg, validate(cfg, int(os.environ.get("WORLD_SIZE", "4")))


def _run(save: str, max_steps: int | None, ckpt: dict) -> list | None:
    import torch.distributed as dist

    from adapter.train.loop import RunOptions, train

    cfg, layout = _config(save, **ckpt)
    records = train(cfg, layout, RunOptions(max_steps=max_steps))
    return [(r["step"], r["loss"], r["batch_count"]) for r in records] if dist.get_rank() == 0 else None


@pytest.mark.multiproc
@pytest.mark.slow
def test_resume_after_restart_is_exact(tmp_path):
    """dp=2 × pp=2 × 2 virtual stages: 6 steps in one go equal 3 steps, a restart, and 3 more."""
    whole = spawn(_run, 4, str(tmp_path / "a"), None, {})[0]
    first = spawn(_run, 4, str(tmp_path / "b"), 3, {})[0]
    assert [r[0] for r in first] == [1, 2, 3] and (tmp_path / "b" / "3" / "3.step").exists()
    second = spawn(_run, 4, str(tmp_path / "b"), None, {})[0]  # new processes: auto-resume from b/3
    assert [r[0] for r in second] == [4, 5, 6]
    assert [r[2] for r in second] == [r[2] for r in whole[3:]]  # the data continues where it stopped
    assert [r[1] for r in first + second] == pytest.approx([r[1] for r in whole], rel=1e-6)
    a, b = open_checkpoint(tmp_path / "a" / "6"), open_checkpoint(tmp_path / "b" / "6")
    assert compare(a, b, atol=1e-6) == []
    # a folder without its completion marker is never picked
    partial = tmp_path / "b" / "9"
    shutil.copytree(tmp_path / "b" / "6", partial)
    (partial / "6.step").unlink()
    assert latest_checkpoint(tmp_path / "b", None) == tmp_path / "b" / "6"
    # weights only: a fresh optimizer and step 0, the saved model
    fresh = spawn(_run, 4, str(tmp_path / "c"), 1, {"load_model_only_folder": f"local:{tmp_path}/a/6",
                                                      "auto_resume": False})[0]
    assert fresh[0][0] == 1 and fresh[0][1] < whole[0][1]  # starts from the trained model's lower loss
