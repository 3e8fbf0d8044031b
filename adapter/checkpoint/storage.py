"""Where checkpoints live: local folders, or S3-compatible object storage through boto3.

Path forms (InternEvo's, plus plain S3):

* ``local:/path`` or a bare path;
* ``boto3:s3://<bucket>.<endpoint ip>[:<port>]/<key>``: InternEvo's form; the endpoint is
  ``http://<ip>:<port or 80>`` and credentials come from ``S3_ACCESS_KEY_ID``/``ACCESS_KEY`` and
  ``S3_SECRET_ACCESS_KEY_ID``/``SECRET_ACCESS_KEY`` when set (InternEvo's variables);
* ``s3://<bucket>/<key>``: endpoint, region and credentials from the usual AWS environment variables and
  config files (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``~/.aws/config``...).

Uploads retry transient failures (HTTP 5xx, throttling, dropped connections) with exponential backoff,
then fail with an error naming the object.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, TypeVar

from adapter.config.errors import ConfigError

T = TypeVar("T")
_INTERNEVO_S3 = re.compile(r"^([^./]+)\.([\d.]+)(?::(\d+))?$")


class StorageError(RuntimeError):
    """Object storage kept failing after the retries; the message names the object."""


@dataclass(frozen=True)
class Location:
    backend: str  # "local" or "s3"
    path: Optional[Path] = None
    bucket: str = ""
    key: str = ""
    endpoint: Optional[str] = None

    def child(self, name: str) -> "Location":
        if self.backend == "local":
            return Location("local", path=self.path / name)
        return Location("s3", bucket=self.bucket, key=f"{self.key}/{name}".strip("/"), endpoint=self.endpoint)

    def __str__(self) -> str:
        return str(self.path) if self.backend == "local" else f"s3://{self.bucket}/{self.key}"


def parse_location(text: str, field: str) -> Location:
    """A checkpoint path from the config; ``field`` names it in errors."""
    if text.startswith("boto3:"):
        rest = text[len("boto3:"):]
        if not rest.startswith("s3://"):
            raise ConfigError(field, f"{text!r}: expected boto3:s3://<bucket>.<endpoint ip>/<key>")
        host, _, key = rest[len("s3://"):].partition("/")
        m = _INTERNEVO_S3.match(host)
        if not m:
            raise ConfigError(field, f"{text!r}: the host part must be <bucket>.<endpoint ip>[:port], got {host!r}")
        return Location("s3", bucket=m[1], key=key.strip("/"), endpoint=f"http://{m[2]}:{m[3] or 80}")
    if text.startswith("s3://"):
        bucket, _, key = text[len("s3://"):].partition("/")
        if not bucket:
            raise ConfigError(field, f"{text!r}: no bucket")
        return Location("s3", bucket=bucket, key=key.strip("/"))
    backend, sep, path = text.partition(":")
    if sep and backend != "local" and "/" not in backend:
        raise ConfigError(field, f"{text!r}: storage {backend!r} is not supported (use local:, boto3:s3:// or s3://)")
    return Location("local", path=Path(path if sep else text))


class ObjectStore:
    """A bucket on an S3-compatible endpoint, with retries around every call."""

    def __init__(self, location: Location, attempts: int = 5, backoff_s: float = 0.5):
        import boto3
        from botocore.config import Config

        kwargs = {}
        key_id = os.environ.get("S3_ACCESS_KEY_ID") or os.environ.get("ACCESS_KEY")
        secret = os.environ.get("S3_SECRET_ACCESS_KEY_ID") or os.environ.get("SECRET_ACCESS_KEY")
        if location.endpoint and key_id and secret:
            kwargs.update(aws_access_key_id=key_id, aws_secret_access_key=secret)
        # its own session: boto3's default one keeps the first credentials it found for the whole process
        self.client = boto3.session.Session().client("s3", endpoint_url=location.endpoint,
                                   config=Config(retries={"max_attempts": 1, "mode": "standard"},
                                                 connect_timeout=5, read_timeout=60), **kwargs)
        self.bucket, self.attempts, self.backoff_s = location.bucket, attempts, backoff_s

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        for attempt in range(1, self.attempts + 1):
            try:
                return call()
            except NoCredentialsError as exc:  # not transient
                raise StorageError(f"{what}: no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                                   "S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY_ID)") from exc
            except (BotoCoreError, ClientError, S3UploadFailedError, OSError) as exc:
                cause = exc if isinstance(exc, ClientError) else exc.__context__
                status = getattr(cause, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if isinstance(cause, ClientError) and status and status < 500 and status != 429:
                    raise StorageError(f"{what}: {exc}") from exc  # not transient
                if attempt == self.attempts:
                    raise StorageError(f"{what}: failed after {attempt} attempts: {exc}") from exc
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def upload(self, local: Path, key: str) -> None:
        self._retry(f"upload s3://{self.bucket}/{key}", lambda: self.client.upload_file(str(local), self.bucket, key))

    def download(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self._retry(f"download s3://{self.bucket}/{key}",
                    lambda: self.client.download_file(self.bucket, key, str(local)))

    def keys(self, prefix: str) -> list[str]:
        def list_all() -> list[str]:
            out, token = [], None
            while True:
                args = {"Bucket": self.bucket, "Prefix": prefix}
                if token:
                    args["ContinuationToken"] = token
                page = self.client.list_objects_v2(**args)
                out += [o["Key"] for o in page.get("Contents", [])]
                if not page.get("IsTruncated"):
                    return out
                token = page["NextContinuationToken"]

        return self._retry(f"list s3://{self.bucket}/{prefix}", list_all)

    def probe(self, prefix: str, write: bool) -> None:
        """Raise ``StorageError`` (one line, naming the bucket or key) unless the bucket exists and, with
        ``write``, an object can be written under ``prefix`` and deleted again."""
        from botocore.exceptions import ClientError

        try:
            self._retry(f"s3://{self.bucket} at {self.client.meta.endpoint_url}",
                        lambda: self.client.head_bucket(Bucket=self.bucket))
        except StorageError as exc:
            cause = exc.__cause__
            status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) \
                if isinstance(cause, ClientError) else 0
            if status == 404:
                raise StorageError(f"s3://{self.bucket}: the bucket does not exist") from None
            if status == 403:
                raise StorageError(f"s3://{self.bucket}: access denied (wrong credentials, or no permission)") from None
            raise
        if write:
            key = f"{prefix}/.internlm-adapter-probe-{os.getpid()}".lstrip("/")
            self._retry(f"write a probe object s3://{self.bucket}/{key}",
                        lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=b""))
            self.delete(key)

    def delete(self, key: str) -> None:
        self._retry(f"delete s3://{self.bucket}/{key}", lambda: self.client.delete_object(Bucket=self.bucket, Key=key))
