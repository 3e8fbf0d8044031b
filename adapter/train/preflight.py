"""Check every checkpoint location a run will use at start-up, before any compute is spent.

Without this, a missing bucket or a folder that cannot be written surfaces at the first save: step 10 of
the demo, hours into a real run. Rank 0 checks, every rank raises the same one-line ``StorageError``:

* ``save_ckpt_folder`` and ``snapshot_ckpt_folder``: object storage must have the bucket and let us write
  and delete a probe object under the key; a local folder must be creatable and writable;
* the staging folder of object-storage saves (``async_upload_tmp_folder``): writable;
* the checkpoint a start loads from (once ``plan_resume`` has chosen it): it must exist.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Optional

from adapter.checkpoint.storage import Location, ObjectStore, StorageError


def _local_writable(field: str, path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".internlm-adapter-probe-"):
            pass
    except OSError as exc:
        raise StorageError(f"{field}: {path} cannot be written: {exc.strerror or exc}") from None


def check_writable(field: str, where: Location) -> None:
    """Raise ``StorageError`` unless checkpoints can be written to ``where``."""
    if where.backend == "local":
        _local_writable(field, where.path)
    else:
        _named(field, lambda: ObjectStore(where).probe(where.key, write=True))


def check_readable(field: str, where: Location) -> None:
    """Raise ``StorageError`` unless ``where`` holds something to load."""
    if where.backend == "local":
        if not where.path.is_dir():
            raise StorageError(f"{field}: {where.path} does not exist (nothing to load)")
        return
    store = ObjectStore(where)
    _named(field, lambda: store.probe(where.key, write=False))
    if not _named(field, lambda: store.keys(where.key + "/")):
        raise StorageError(f"{field}: {where} holds no objects (nothing to load)")


def _named(field: str, call: Callable):
    try:
        return call()
    except StorageError as exc:
        raise StorageError(f"{field}: {exc}") from None


def on_rank0(check: Callable[[], None]) -> None:
    """Run ``check`` on rank 0; every rank raises its error (collective: call it on all ranks)."""
    import torch.distributed as dist  # here: the checks themselves stay torch-free

    message: list[Optional[str]] = [None]
    if dist.get_rank() == 0:
        try:
            check()
        except StorageError as exc:
            message[0] = str(exc)
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise StorageError(message[0])
