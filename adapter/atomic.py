"""Write a directory so that it appears whole or not at all, and never at the cost of files we did not write.

Outputs are built in a hidden temporary sibling of the target (``.<name>.XXXX.tmp``) and renamed into
place at the end, so a crash or an error never leaves a half-written target. The rules that keep a user's
files safe, all on real paths (symlinks, ``..`` and ``.`` resolved first):

* the target may not overlap an input: not the same folder, not inside it, not around it;
* an existing non-empty target is refused unless ``overwrite`` is set, and even then it is replaced only
  when it holds our marker (``MARKER``, written into every output) and nothing but the files that marker
  lists: a folder someone else wrote, or ours with a file added since, is never deleted;
* every hidden folder we make carries a marker with our process id, so a later run of the same target
  removes the ones a killed run left (and puts back a target a crash left moved aside), and touches no
  hidden folder that is not ours or whose process still runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

MARKER = ".internlm-adapter.json"
"""In every folder this package writes: ``{"written_by": ..., "files": [...], "pid": ..., "host": ...}``
(``"partial": true`` while it is being written); the process id tells a later run whether it may clean up."""
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class TargetExistsError(FileExistsError):
    """The target exists and may not be replaced (not empty without ``overwrite``, or not ours)."""


class OverlapError(ValueError):
    """The target and an input are the same folder, or one holds the other: writing would destroy the input."""


class NoSpaceError(OSError):
    """The target's file system is (or would be) full; the message names the target."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def real(path: str | os.PathLike) -> Path:
    """``path`` with ``~``, symlinks, ``..`` and ``.`` resolved (the part that exists; the rest as written)."""
    return Path(path).expanduser().resolve()


def check_separate(inputs: Iterable[str | os.PathLike], target: str | os.PathLike) -> None:
    """Raise ``OverlapError`` when ``target`` is an input, lies inside one, or holds one."""
    out = real(target)
    for given in inputs:
        src = real(given)
        if src == out:
            raise OverlapError(f"{target} is the input {given} (the same folder): the output must go elsewhere")
        if src in out.parents:
            raise OverlapError(f"{target} lies inside the input {given}: the output must go elsewhere")
        if out in src.parents:
            raise OverlapError(f"{target} holds the input {given}: replacing it would delete the input")


def _written_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()} - {MARKER}


def _ours(folder: Path) -> dict | None:
    """The marker's content when ``folder`` holds a readable marker of ours, else None."""
    try:
        mark = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) and mark.get("written_by") == "internlm-adapter" else None


def check_target(target: str | os.PathLike, overwrite: bool) -> Path:
    """The real path of ``target``; raises ``TargetExistsError`` unless it is absent, an empty folder, or (with
    ``overwrite``) a folder this package wrote that holds nothing else."""
    path = real(target)
    if path.exists() and not path.is_dir():
        raise TargetExistsError(f"{target} exists and is not a folder")
    if not path.is_dir() or not any(path.iterdir()):
        return path
    if not overwrite:
        raise TargetExistsError(f"{target} exists and is not empty (pass --overwrite to replace a folder this "
                                "tool wrote)")
    if os.path.ismount(path):
        raise TargetExistsError(f"{target} is a mount point; it cannot be replaced, only written into when empty")
    mark = _ours(path)
    if mark is None or mark.get("partial"):
        raise TargetExistsError(f"{target} was not written by internlm-adapter (no complete {MARKER} in it), so "
                                "--overwrite does not replace it; remove it yourself or choose another folder")
    extra = sorted(_written_files(path) - set(mark.get("files", ())))
    if extra:
        listed = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise TargetExistsError(f"{target} holds files internlm-adapter did not write ({listed}), so --overwrite "
                                "does not replace it; move them out first")
    return path


def _mark(folder: Path, **fields: object) -> None:
    (folder / MARKER).write_text(json.dumps({"written_by": "internlm-adapter", **fields, "pid": os.getpid(),
                                             "host": socket.gethostname()}, indent=1))


def _alive(mark: dict) -> bool:
    """Whether the process that wrote a marker may still run (always True for another host's)."""
    if mark.get("host") != socket.gethostname() or not isinstance(mark.get("pid"), int):
        return True
    try:
        os.kill(mark["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftovers(path: Path) -> list[Path]:
    """Hidden ``.tmp``/``.old`` siblings of ``path`` that a run of this package left."""
    prefix = f".{path.name}."
    if not path.parent.is_dir():
        return []
    found = []
    for p in sorted(path.parent.iterdir()):
        if p.name.startswith(prefix) and p.name.endswith((".tmp", ".old")) and p.is_dir() and not p.is_symlink():
            if _ours(p) is not None:
                found.append(p)
    return found


def recover(path: Path) -> None:
    """Clean up after killed runs of ``path``: put back a target a crash left moved aside (when ``path`` is
    gone), then delete their temporary folders. Folders of a still running process are left alone."""
    for folder in leftovers(path):
        if _alive(_ours(folder)):
            continue
        if folder.name.endswith(".old") and (folder / path.name).is_dir() and not path.exists():
            os.replace(folder / path.name, path)
        shutil.rmtree(folder)


def _swap(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path``; an existing (checked) ``path`` is moved aside first and deleted last."""
    if not path.exists() or not any(path.iterdir()):
        os.replace(tmp, path)  # rename(2) replaces an empty folder in one step
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    _mark(old, partial=True, target=str(path))
    os.replace(path, old / path.name)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old / path.name, path)
        raise
    shutil.rmtree(old)


def require_space(target: str | os.PathLike, nbytes: int) -> None:
    """Raise ``NoSpaceError`` unless the file system that will hold ``target`` has room for ``nbytes`` of
    tensor data, plus 1% and 1 MiB for the files' headers, pickles and small files."""
    where = real(target)
    while not where.exists():
        where = where.parent
    nbytes += nbytes // 100 + 2**20
    free = shutil.disk_usage(where).free
    if free < nbytes:
        raise NoSpaceError(f"no space left on {target}: the output needs {_size(nbytes)}, {_size(free)} is free")


def _size(nbytes: float) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    while nbytes >= 1024 and len(units) > 1:
        nbytes, units = nbytes / 1024, units[1:]
    return f"{nbytes:.1f} {units[0]}"


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False,
                     inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` when the block finishes without error.

    ``inputs`` are the paths the block reads; a target overlapping one is refused (``OverlapError``). A
    full file system inside the block becomes ``NoSpaceError`` naming ``target``."""
    check_separate(inputs, target)
    path = real(target)
    recover(path)
    check_target(target, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        try:
            _mark(tmp, partial=True, target=str(path))
            yield tmp
            _mark(tmp, files=sorted(_written_files(tmp)))  # the final marker: what --overwrite may replace
        except OSError as exc:
            if exc.errno in _NO_SPACE and not isinstance(exc, NoSpaceError):
                raise NoSpaceError(f"no space left on {target} ({os.strerror(exc.errno)})") from exc
            raise
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; give it the permissions of a normal mkdir
        _swap(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
