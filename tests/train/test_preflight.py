"""The start-up storage checks on local folders no one may write: a read-only mount refuses even root, so
these run in a user and mount namespace (``tests.tmpfs``) and skip where it is unavailable."""

from __future__ import annotations

import sys

from tests.tmpfs import in_small_tmpfs

SCRIPT = """
import sys
from pathlib import Path
from adapter.checkpoint.storage import Location, StorageError
from adapter.train.preflight import check_writable
for field, sub in (("ckpt.save_ckpt_folder", "ckpt"), ("ckpt.async_upload_tmp_folder", "staging/job"),
                   ("ckpt.snapshot_ckpt_folder", "")):
    try:
        check_writable(field, Location("local", path=Path(sys.argv[1]) / sub))
    except StorageError as exc:
        print(exc)
    else:
        print("written")
"""


def test_a_read_only_folder_is_refused_in_one_line_naming_the_field():
    proc = in_small_tmpfs(f"mount -o remount,ro $M; {sys.executable} -c '{SCRIPT}' $M; ls -A $M", size="64k")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 3, proc.stdout + proc.stderr
    for line, (field, sub) in zip(lines, (("ckpt.save_ckpt_folder", "/ckpt"),
                                          ("ckpt.async_upload_tmp_folder", "/staging/job"),
                                          ("ckpt.snapshot_ckpt_folder", ""))):
        assert line.startswith(f"{field}: /") and line.endswith(f"{sub} cannot be written: Read-only file system"), line
