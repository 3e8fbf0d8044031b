"""Training checkpoints on a real S3 endpoint (moto's server over HTTP): async upload, resume, failures."""

from __future__ import annotations

import os

import pytest

from adapter.config import RawConfig, normalize, validate
from tests.conftest import REPO, base_sections
from tests.s3 import S3Server
from tests.spawn import spawn


@pytest.fixture
def s3(monkeypatch):
    server = S3Server()
    server.client().create_bucket(Bucket="ckpt")
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)  # inherited by the spawned ranks
    yield server
    server.close()


def _run(max_steps: int, ckpt: dict) -> list | None:
    import torch.distributed as dist

    from adapter.train.loop import RunOptions, train

    s = base_sections()
    s["model"].update(num_layers=2, vocab_size=264)
    s["data"].update(seq_len=32, micro_bsz=1, micro_num=2, total_steps=4, train_folder=str(REPO / "launch/data/tiny"))
    s["ckpt"] = ckpt
    s["enable_tb"] = False
    cfg = normalize(RawConfig(s, "s3.py", {}))
    records = train(cfg, validate(cfg, int(os.environ["WORLD_SIZE"])), RunOptions(max_steps=max_steps))
    return [(r["step"], r["batch_count"]) for r in records] if dist.get_rank() == 0 else None


@pytest.mark.multiproc
@pytest.mark.slow
def test_async_upload_and_resume_from_s3(s3, tmp_path):
    ckpt = dict(enable_save_ckpt=True, save_ckpt_folder="s3://ckpt/run", checkpoint_every=2, async_upload=True,
                async_upload_tmp_folder=str(tmp_path / "staging"), auto_resume=True)
    first = spawn(_run, 2, 2, ckpt)[0]
    assert [r[0] for r in first] == [1, 2]
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket="ckpt")["Contents"]}
    assert {"run/2/2.step", "run/2/model_tp0_pp0.pt", "run/2/context.pt", "run/2/sampler.pt"} <= keys
    assert any(k.startswith("run/2/deepspeed/") and "optim_states" in k for k in keys)
    second = spawn(_run, 2, None, ckpt)[0]  # new processes: resume from the newest marker on S3
    assert [r[0] for r in second] == [3, 4] and second[0][1] == first[-1][1] + 1
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket="ckpt")["Contents"]}
    assert "run/4/4.step" in keys


@pytest.mark.multiproc
@pytest.mark.slow
def test_upload_failure_stops_training_and_leaves_no_marker(s3, tmp_path):
    s3.proxy.fail(-1, "500")  # the endpoint fails every request from now on
    ckpt = dict(enable_save_ckpt=True, save_ckpt_folder="s3://ckpt/run", checkpoint_every=2, async_upload=True,
                async_upload_tmp_folder=str(tmp_path / "staging"), auto_resume=False)
    with pytest.raises(RuntimeError, match=r"s3://ckpt/run"):
        spawn(_run, 2, 2, ckpt)
    s3.proxy.fail(0)
    listing = s3.client().list_objects_v2(Bucket="ckpt")
    assert not [o["Key"] for o in listing.get("Contents", []) if o["Key"].endswith(".step")]
