"""Object storage against moto's S3 server over HTTP, with injected faults."""

from __future__ import annotations

import json

import pytest

from adapter.checkpoint.storage import Location, ObjectStore, StorageError, parse_location
from adapter.config.errors import ConfigError
from tests.s3 import S3Server


@pytest.fixture
def s3(monkeypatch):
    server = S3Server()
    server.client().create_bucket(Bucket="ckpt")
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    yield server
    server.close()


def test_parse_locations():
    assert parse_location("local:/a/b", "f") == Location("local", path=__import__("pathlib").Path("/a/b"))
    assert parse_location("runs/x", "f").path.as_posix() == "runs/x"
    loc = parse_location("boto3:s3://model_weights.10.1.2.3/internlm/run", "f")
    assert (loc.bucket, loc.key, loc.endpoint) == ("model_weights", "internlm/run", "http://10.1.2.3:80")
    assert parse_location("boto3:s3://b.127.0.0.1:9000/k", "f").endpoint == "http://127.0.0.1:9000"
    s3 = parse_location("s3://bucket/a/b/", "f")
    assert (s3.bucket, s3.key, s3.endpoint) == ("bucket", "a/b", None)
    assert str(s3.child("5")) == "s3://bucket/a/b/5"
    with pytest.raises(ConfigError, match="ckpt.save_ckpt_folder: 'volc:x/y'"):
        parse_location("volc:x/y", "ckpt.save_ckpt_folder")
    with pytest.raises(ConfigError, match="<bucket>.<endpoint ip>"):
        parse_location("boto3:s3://no-endpoint/key", "f")


def test_upload_list_download_round_trip(s3, tmp_path):
    store = ObjectStore(parse_location("s3://ckpt/run", "f"), backoff_s=0.01)
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    store.upload(tmp_path / "a.bin", "run/1/a.bin")
    assert store.keys("run/") == ["run/1/a.bin"]
    store.download("run/1/a.bin", tmp_path / "back" / "a.bin")
    assert (tmp_path / "back" / "a.bin").read_bytes() == b"x" * 1000
    store.delete("run/1/a.bin")
    assert store.keys("run/") == []


@pytest.mark.parametrize("mode", ["500", "drop"])
def test_transient_faults_are_retried(s3, tmp_path, mode):
    store = ObjectStore(parse_location("s3://ckpt/run", "f"), attempts=5, backoff_s=0.01)
    (tmp_path / "a.bin").write_bytes(b"y" * 100)
    s3.proxy.fail(2, mode)
    store.upload(tmp_path / "a.bin", "run/a.bin")
    assert s3.client().get_object(Bucket="ckpt", Key="run/a.bin")["Body"].read() == b"y" * 100


def test_persistent_failure_is_a_clear_error(s3, tmp_path):
    store = ObjectStore(parse_location("s3://ckpt/run", "f"), attempts=3, backoff_s=0.01)
    (tmp_path / "a.bin").write_bytes(b"z")
    s3.stop_backend()  # the server goes away
    with pytest.raises(StorageError, match=r"upload s3://ckpt/run/a.bin: failed after 3 attempts"):
        store.upload(tmp_path / "a.bin", "run/a.bin")


def test_wrong_credentials_are_refused_at_start_up_naming_the_bucket(monkeypatch, tmp_path):
    """moto checking credentials: the run's storage check (what rank 0 does before step 1) passes with the
    trainer's access key and is refused in one line naming the field and bucket with a wrong secret or an
    unknown key; with the right key, an S3 save's staging folder that cannot be written is refused too."""
    from adapter.config import RawConfig, normalize, validate
    from adapter.train.checkpointing import Checkpointer
    from tests.conftest import base_sections

    server = S3Server(auth_after=4)  # the four set-up requests below, then every request is checked
    try:
        server.client().create_bucket(Bucket="ckpt")
        iam = server.client("iam")
        iam.create_user(UserName="trainer")
        iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        s = base_sections()
        s["ckpt"] = dict(enable_save_ckpt=True, save_ckpt_folder="s3://ckpt/run", checkpoint_every=2,
                         async_upload=True, async_upload_tmp_folder=str(tmp_path / "staging"))
        cfg = normalize(RawConfig(s, "s3.py", {}))
        layout = validate(cfg, 1)
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        for key_id, secret, refused in ((key["AccessKeyId"], key["SecretAccessKey"], False),
                                        (key["AccessKeyId"], "wrong-secret", True),
                                        ("AKIAUNKNOWN0000000000", "x", True)):
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
            checkpointer = Checkpointer(cfg, layout)
            if not refused:
                checkpointer.check_locations()
                continue
            with pytest.raises(StorageError) as info:
                checkpointer.check_locations()
            assert str(info.value) == ("ckpt.save_ckpt_folder: s3://ckpt: access denied (wrong credentials, or no "
                                       "permission)")
        # the right credentials, but a staging folder that cannot be made (under a file: denied to root too)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        (tmp_path / "a-file").write_text("")
        s["ckpt"]["async_upload_tmp_folder"] = str(tmp_path / "a-file" / "staging")
        cfg = normalize(RawConfig(s, "s3.py", {}))
        with pytest.raises(StorageError) as info:
            Checkpointer(cfg, layout).check_locations()
        assert str(info.value) == (f"ckpt.async_upload_tmp_folder: {tmp_path / 'a-file' / 'staging' / 'test'} "
                                   "cannot be written: Not a directory")
    finally:
        server.close()
