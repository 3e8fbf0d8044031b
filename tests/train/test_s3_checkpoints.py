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
    assert any(k.startswith("run/2/optimizer/exp_avg/") for k in keys)
    second = spawn(_run, 2, None, ckpt)[0]  # new processes: resume from the newest marker on S3
    assert [r[0] for r in second] == [3, 4] and second[0][1] == first[-1][1] + 1
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket="ckpt")["Contents"]}
    assert "run/4/4.step" in keys


def _spawn_error(ckpt: dict) -> str:
    """Run 2 ranks that must fail; their error."""
    with pytest.raises(RuntimeError) as info:
        spawn(_run, 2, 2, ckpt)
    return str(info.value)


@pytest.mark.multiproc
@pytest.mark.slow
def test_storage_is_checked_before_step_1(s3, tmp_path):
    """A missing bucket, a bucket we may not write, a local folder that cannot be written: refused at start-up,
    naming the field and the bucket or path, before any step (nothing is staged or logged). The first case
    runs the trainer on 2 ranks; the others call the same checks rank 0 makes before step 1."""
    from adapter.checkpoint.storage import StorageError, parse_location
    from adapter.train.checkpointing import Checkpointer
    from adapter.train.preflight import check_readable

    staging = tmp_path / "staging"
    base = dict(enable_save_ckpt=True, checkpoint_every=2, async_upload_tmp_folder=str(staging), auto_resume=False)
    error = _spawn_error(dict(base, save_ckpt_folder="s3://nobucket/run"))
    assert "ckpt.save_ckpt_folder: s3://nobucket: the bucket does not exist" in error

    def refusal(ckpt: dict) -> str:
        s = base_sections()
        s["ckpt"] = ckpt
        cfg = normalize(RawConfig(s, "s3.py", {}))
        with pytest.raises(StorageError) as info:
            Checkpointer(cfg, validate(cfg, 1)).check_locations()
        return str(info.value)

    error = refusal(dict(base, save_ckpt_folder="s3://ckpt/run", oss_snapshot_freq=3,
                         snapshot_ckpt_folder="s3://missing-snapshots/snap"))
    assert error == "ckpt.snapshot_ckpt_folder: s3://missing-snapshots: the bucket does not exist"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert refusal(dict(base, save_ckpt_folder=f"local:{blocker}/ckpt")).startswith(
        f"ckpt.save_ckpt_folder: {blocker}/ckpt cannot be written")
    with pytest.raises(StorageError, match="ckpt.load_ckpt_folder: s3://ckpt/none holds no objects"):
        check_readable("ckpt.load_ckpt_folder", parse_location("s3://ckpt/none", "ckpt.load_ckpt_folder"))
    assert not staging.exists()  # nothing was saved: no step ran


@pytest.mark.multiproc
@pytest.mark.slow
def test_a_failed_upload_is_kept_and_uploaded_by_the_next_start(s3, tmp_path):
    """The endpoint dies mid-upload: training stops naming the object and where the checkpoint is, no marker is
    on S3; the next start uploads it (marker last) and resumes from it."""
    staging = tmp_path / "staging"
    ckpt = dict(enable_save_ckpt=True, save_ckpt_folder="s3://ckpt/run", checkpoint_every=2, async_upload=True,
                async_upload_tmp_folder=str(staging), auto_resume=True)
    s3.proxy.fail(-1, "500", after=5)  # the start-up checks and listings pass, the uploads fail
    with pytest.raises(RuntimeError, match=rf"s3://ckpt/run/2.*kept complete in {staging}/test/2"):
        spawn(_run, 2, 2, ckpt)
    s3.proxy.fail(0)
    assert (staging / "test" / "2" / "2.step").exists() and (staging / "test" / "2.pending.json").exists()
    listing = s3.client().list_objects_v2(Bucket="ckpt")
    assert not [o["Key"] for o in listing.get("Contents", []) if o["Key"].endswith(".step")]
    resumed = spawn(_run, 2, None, ckpt)[0]
    assert [r[0] for r in resumed] == [3, 4]  # resumed from the uploaded step 2
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket="ckpt")["Contents"]}
    assert {"run/2/2.step", "run/2/model_tp0_pp0.pt", "run/4/4.step"} <= keys
    assert not (staging / "test" / "2").exists() and not (staging / "test" / "2.pending.json").exists()
