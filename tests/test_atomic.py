"""``adapter.atomic``: an output never costs a file we did not write, and killed runs leave nothing behind.

Real folders, real symlinks, real killed processes; a property test (hypothesis) checks the rule over
random trees: whatever the target and the flags, every file that was there before and is not ours is
still there, byte for byte, and no hidden folder is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter.atomic import (MARKER, NoSpaceError, OverlapError, TargetExistsError, atomic_directory, check_separate,
                            leftovers, recover, require_space)
from tests.conftest import REPO


def _write(target: Path, files: dict[str, str], **kwargs) -> None:
    with atomic_directory(target, **kwargs) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_output_is_marked_with_the_files_it_holds(tmp_path):
    _write(tmp_path / "out", {"a.txt": "1", "sub/b.txt": "2"})
    mark = json.loads((tmp_path / "out" / MARKER).read_text())
    assert mark["written_by"] == "internlm-adapter" and mark["files"] == ["a.txt", "sub/b.txt"]
    assert not mark.get("partial") and leftovers(tmp_path / "out") == []
    assert oct((tmp_path / "out").stat().st_mode & 0o777) == oct(0o755)


def test_overwrite_replaces_only_what_we_wrote(tmp_path):
    out = tmp_path / "out"
    _write(out, {"a.txt": "1"})
    with pytest.raises(TargetExistsError, match="--overwrite"):
        _write(out, {"a.txt": "2"})
    _write(out, {"a.txt": "2"}, overwrite=True)
    assert (out / "a.txt").read_text() == "2"
    (out / "notes.md").write_text("mine")  # the user adds a file to our output
    with pytest.raises(TargetExistsError, match="notes.md"):
        _write(out, {"a.txt": "3"}, overwrite=True)
    assert (out / "notes.md").read_text() == "mine" and (out / "a.txt").read_text() == "2"
    user = tmp_path / "user"  # a folder we never wrote
    user.mkdir()
    (user / "optimizer.pt").write_text("precious")
    with pytest.raises(TargetExistsError, match="not written by internlm-adapter"):
        _write(user, {"a.txt": "x"}, overwrite=True)
    (user / MARKER).write_text("{not json")  # a damaged or forged marker is not ours either
    with pytest.raises(TargetExistsError, match="not written by internlm-adapter"):
        _write(user, {"a.txt": "x"}, overwrite=True)
    assert (user / "optimizer.pt").read_text() == "precious"
    with pytest.raises(TargetExistsError, match="not a folder"):
        _write(user / "optimizer.pt", {"a.txt": "x"}, overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    _write(empty, {"a.txt": "1"})  # an empty folder is simply filled
    assert (empty / "a.txt").exists() and leftovers(empty) == []


@pytest.mark.parametrize("spell", ["same", "dotdot", "dot", "symlink", "inside", "around", "around_symlink"])
def test_inputs_and_target_may_not_overlap(tmp_path, monkeypatch, spell):
    src = tmp_path / "40b"
    (src / "sub").mkdir(parents=True)
    (src / "model_tp0_pp0.pt").write_text("weights")
    os.symlink(src, tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    target = {"same": src, "dotdot": "./40b/../40b", "dot": "40b/.", "symlink": tmp_path / "link",
              "inside": src / "sub" / "out", "around": tmp_path, "around_symlink": "link/.."}[spell]
    with pytest.raises(OverlapError):
        check_separate([src], target)
    for overwrite in (False, True):
        with pytest.raises(OverlapError):
            _write(Path(target), {"config.json": "{}"}, overwrite=overwrite, inputs=[src])
    assert (src / "model_tp0_pp0.pt").read_text() == "weights" and leftovers(src) == []
    check_separate([src], tmp_path / "40b-hf")  # a sibling is fine, even one whose name starts alike


def _killed_run(target: Path, stage: str) -> None:
    """A process that dies by SIGKILL inside ``atomic_directory``: while writing, or between moving the old
    target aside and moving the new one in."""
    code = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        import adapter.atomic as atomic
        target = Path({str(target)!r})
        if {stage!r} == "swap":
            real_replace = os.replace
            def replace(a, b):
                real_replace(a, b)
                if str(b).endswith(".old/" + target.name):
                    os.kill(os.getpid(), signal.SIGKILL)
            atomic.os.replace = replace
        with atomic.atomic_directory(target, overwrite=True) as tmp:
            (tmp / "big.bin").write_bytes(b"x" * 4096)
            if {stage!r} == "write":
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL


def test_killed_runs_are_cleaned_up_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    _killed_run(out, "write")
    assert [p.name.endswith(".tmp") for p in leftovers(out)] == [True] and not out.exists()
    _write(out, {"a.txt": "1"})
    assert leftovers(out) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_target_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    out = tmp_path / "out"
    _write(out, {"a.txt": "old"})
    _killed_run(out, "swap")
    assert not out.exists() and len(leftovers(out)) == 2  # the new .tmp and the .old holding the target
    with pytest.raises(TargetExistsError):  # recovered first, so without --overwrite it is refused
        _write(out, {"a.txt": "new"})
    assert (out / "a.txt").read_text() == "old" and leftovers(out) == []


def test_hidden_folders_that_are_not_ours_or_still_in_use_are_kept(tmp_path):
    out = tmp_path / "out"
    foreign = tmp_path / ".out.mine.tmp"  # the user's own folder with a name like ours
    foreign.mkdir()
    (foreign / "keep.txt").write_text("keep")
    with atomic_directory(out) as tmp:  # our own run, in progress: a second run must not touch it
        (tmp / "a.txt").write_text("1")
        assert leftovers(out) == [tmp]
        recover(out)
        assert (tmp / "a.txt").exists()
    assert (out / "a.txt").exists() and (foreign / "keep.txt").read_text() == "keep"


def test_a_full_file_system_is_named(tmp_path):
    with pytest.raises(NoSpaceError, match=f"no space left on {tmp_path / 'out'}"):
        require_space(tmp_path / "out" / "deeper", 2**62)
    require_space(tmp_path / "out", 1)
    with pytest.raises(NoSpaceError, match="no space left on .*out"):
        with atomic_directory(tmp_path / "out"):
            raise OSError(28, "No space left on device")
    assert leftovers(tmp_path / "out") == [] and not (tmp_path / "out").exists()


NAMES = st.sampled_from(["a", "b", "c"])
TREES = st.lists(st.tuples(st.lists(NAMES, min_size=1, max_size=3), st.booleans()), max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=TREES, target=st.lists(st.sampled_from(["a", "b", "c", "..", "."]), min_size=1, max_size=4),
       source=st.lists(NAMES, max_size=2), overwrite=st.booleans(), ours=st.booleans(), link=st.booleans())
def test_property_no_file_we_did_not_write_is_ever_lost(tmp_path_factory, tree, target, source, overwrite, ours,
                                                          link):
    """Random user files, maybe one of our outputs and a symlink among them, a random target path (with
    ``..`` and ``.``) and input: the write either succeeds or is refused, and every user file survives."""
    root = tmp_path_factory.mktemp("tree") / "root"
    root.mkdir()
    for parts, is_dir in tree:
        path = root.joinpath(*parts)
        if path.exists() or any(p.is_file() for p in path.parents):
            continue
        if is_dir:
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("/".join(parts))
    if ours:
        _write(root / "ours", {"x.txt": "ours"})
    if link and not (root / "l").exists():
        os.symlink(root / "ours" if ours else root, root / "l")
    before = {k: v for k, v in _snapshot(root).items() if not k.startswith(("ours/", "l/"))}  # the user's
    src = root.joinpath(*source)
    dst = root.joinpath("l" if link else "ours", *target)
    try:
        _write(dst, {"new.txt": "new"}, overwrite=overwrite, inputs=[src])
    except (OverlapError, TargetExistsError, NotADirectoryError, FileExistsError):
        pass
    after = _snapshot(root)
    assert {k for k in before if after.get(k) != before[k]} == set()
    hidden = [p for p in root.rglob(".*") if p.name != MARKER]
    assert not hidden
