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


IMPORT = """
import sys
from pathlib import Path
from adapter.checkpoint.errors import CheckpointError
from adapter.config import read_config
from adapter.train.state_files import _import_internevo
fixture = Path(sys.argv[2])
cfg, _ = read_config(fixture / "config.py", world_size=2)
try:
    _import_internevo(fixture / "ckpt" / "4", cfg.model, Path(sys.argv[1]) / "import")
except CheckpointError as exc:
    print(exc)
else:
    print("converted")
"""


def test_importing_internevo_optimizer_checks_the_temporary_disk_first():
    """InternEvo's optimizer state (960 KiB of files here) is converted into $TMPDIR before a resume: a disk
    too small for it is refused before anything is written, naming TMPDIR; one large enough is used."""
    from tests.conftest import FIXTURES

    fixture = FIXTURES / "internlm2_traj_zero2"
    for size, expected in (("256k", "no space left on"), ("4m", "converted")):
        proc = in_small_tmpfs(f"{sys.executable} -c '{IMPORT}' $M {fixture}; ls -A $M", size=size)
        lines = proc.stdout.splitlines()
        assert proc.returncode == 0 and lines and lines[0].startswith(expected), proc.stdout + proc.stderr
        if size == "256k":
            assert "set TMPDIR" in lines[0] and lines[1:] == [], lines  # nothing written
