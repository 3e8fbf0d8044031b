"""Write a directory so that it appears whole or not at all.

Outputs are built in a hidden temporary sibling of the target and renamed into place at the end, so a
crash or an error never leaves a half-written target. An existing non-empty target is refused unless
``overwrite`` is set; it is then swapped out only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


class TargetExistsError(FileExistsError):
    """The target directory exists and is not empty, and overwriting was not asked for."""


def check_target(target: str | os.PathLike, overwrite: bool) -> Path:
    """Raise ``TargetExistsError`` unless ``target`` is absent, empty, or may be overwritten."""
    path = Path(target)
    if path.exists() and not path.is_dir():
        raise TargetExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise TargetExistsError(f"{path} exists and is not empty (pass --overwrite to replace it)")
    return path


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` when the block finishes without error."""
    path = check_target(target, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; give it the permissions of a normal mkdir
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
