"""``internlm-ckpt`` as an adversarial user runs it: outputs onto inputs, bad sizes, a full disk, a closed pipe,
a missing shard. Every case gives one line and the documented exit status, and leaves the inputs untouched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adapter.atomic import MARKER
from adapter.checkpoint.convert import compare, open_checkpoint
from adapter.cli.ckpt import main
from tests.conftest import FIXTURES, REPO, base_sections, render_sections
from tests.tmpfs import in_small_tmpfs

SRC = FIXTURES / "internlm2_tiny" / "ckpt"


def _cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adapter.cli.ckpt", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, **kwargs)


def _run(capsys, *args) -> tuple[int, str]:
    """``main`` in this process (exit status, stderr); argparse's usage errors included."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def training_ckpt(tmp_path) -> Path:
    """A training checkpoint as earlier versions of the trainer left it: model shards plus DeepSpeed's optimizer
    files, sampler and step files (``--to internevo`` of it needs ``--weights-only``: its optimizer files are cut
    for one layout; ``tests/cli/test_ckpt_state.py`` converts whole training checkpoints)."""
    folder = tmp_path / "self" / "40"
    shutil.copytree(SRC, folder)
    (folder / "deepspeed").mkdir()
    (folder / "deepspeed" / "optim_states.pt").write_bytes(b"optimizer")
    (folder / "sampler.pt").write_bytes(b"sampler")
    return folder


def test_output_onto_its_input_is_refused(capsys, tmp_path, training_ckpt, monkeypatch):
    before = _files(tmp_path)
    (tmp_path / "link").symlink_to(training_ckpt)
    monkeypatch.chdir(training_ckpt.parent)
    for dst in (training_ckpt, "./40/../40", "40/.", tmp_path / "link", training_ckpt / "hf", tmp_path / "self"):
        for extra in (["--overwrite"], ["--dry-run"]):
            rc, err = _run(capsys, "convert", "40", dst, "--to", "hf", *extra)
            assert rc == 2 and err.count("\n") == 1 and ("is the input" in err or "the input" in err), (dst, err)
    config = tmp_path / "cfgs" / "c.py"  # a --config file inside the target is an input too
    config.parent.mkdir()
    config.write_text(render_sections(base_sections()))
    before["cfgs/c.py"] = config.read_bytes()
    rc, err = _run(capsys, "convert", "40", config.parent, "--to", "hf", "--config", config, "--overwrite")
    assert rc == 2 and "holds the input" in err
    assert {k: v for k, v in _files(tmp_path).items() if not k.startswith("link/")} == before
    assert [p for p in tmp_path.rglob(".*")] == []


def test_overwrite_replaces_only_a_folder_this_tool_wrote(capsys, tmp_path, training_ckpt):
    out = tmp_path / "out"
    assert _run(capsys, "convert", training_ckpt, out, "--to", "hf")[0] == 0
    assert MARKER in os.listdir(out)
    rc, err = _run(capsys, "convert", training_ckpt, out, "--to", "internevo", "--overwrite", "--weights-only")
    assert rc == 0 and (out / "model_tp0_pp0.pt").exists() and not (out / "config.json").exists()
    before = _files(tmp_path)
    other = tmp_path / "other"
    shutil.copytree(SRC, other)  # another training checkpoint, not an input: still not ours to replace
    rc, err = _run(capsys, "convert", training_ckpt, other, "--to", "hf", "--overwrite")
    assert rc == 1 and "not written by internlm-adapter" in err and err.count("\n") == 1
    assert _files(other) == _files(SRC)
    (out / "README.md").write_text("my notes")  # a file the user added to our output
    rc, err = _run(capsys, "convert", training_ckpt, out, "--to", "hf", "--overwrite")
    assert rc == 1 and "README.md" in err and (out / "README.md").read_text() == "my notes"
    assert {k: v for k, v in _files(tmp_path).items() if not k.startswith(("other/", "out/README"))} == before


def test_bad_sizes_are_usage_errors(capsys, tmp_path):
    out = tmp_path / "out"
    for args in (["--tp", "-2"], ["--tp", "0"], ["--pp", "0"], ["--vpp", "0"], ["--tp", "x"]):
        rc, err = _run(capsys, "convert", SRC, out, "--to", "internevo", *args)
        assert rc == 2 and ("positive integer" in err or "not an integer" in err), (args, err)
    rc, err = _run(capsys, "convert", SRC, out, "--to", "internevo", "--tp", "3")
    assert rc == 2 and "--tp 3 does not divide" in err and err.count("\n") == 1
    rc, err = _run(capsys, "convert", SRC, out, "--to", "mcore", "--pp", "99")
    assert rc == 2 and err.count("\n") == 1
    for atol in ("nan", "-1", "inf"):
        rc, err = _run(capsys, "verify", SRC, SRC, "--atol", atol)
        assert rc == 2 and "finite number" in err, atol
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_verify_counts_nan_as_a_difference(tmp_path):
    a = open_checkpoint(SRC)
    key = next(iter(a.tensors))
    one, other = a.tensors[key].clone(), a.tensors[key].clone()
    other.view(-1)[0] = float("nan")

    class Only:  # a checkpoint of one tensor, for compare's sake
        def __init__(self, t):
            self.tensors = {key: t}

    assert compare(Only(one), Only(other), atol=1.0) != []
    assert compare(Only(other), Only(other.clone()), atol=1.0) == []  # the same NaN on both sides matches
    inf = one.clone()
    inf.view(-1)[0] = float("inf")
    assert compare(Only(inf), Only(inf.clone()), atol=1e-3) == [] and compare(Only(inf), Only(one), atol=1e3) != []


def test_inspect_names_a_missing_last_shard(tmp_path):
    """tp=2: the file names alone would say tp=1 with half of every tensor."""
    full = tmp_path / "tp2"
    assert _cli("convert", SRC, full, "--to", "internevo", "--tp", "2").returncode == 0
    (full / "model_tp1_pp0.pt").unlink()
    proc = _cli("inspect", full)
    assert proc.returncode == 1 and proc.stdout == "" and proc.stderr.count("\n") == 1
    assert "saved at tp=2" in proc.stderr and "tp ranks 1..1 are missing" in proc.stderr


def test_a_closed_pipe_is_not_an_error():
    """``internlm-ckpt inspect ... | head -1``: the reader went away; exit 0, nothing on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "adapter.cli.ckpt", "inspect", str(SRC), "--tensors"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    proc.stdout.close()
    assert proc.wait() == 0 and proc.stderr.read() == b""


@pytest.mark.parametrize("fmt", ["internevo", "mcore", "mcore-legacy", "hf"])
def test_a_full_disk_is_one_line_and_leaves_nothing(fmt):
    """The free space is checked against the planned size before anything is written."""
    proc = in_small_tmpfs(f"""{sys.executable} -m adapter.cli.ckpt convert {SRC} $M/out --to {fmt} || echo "rc=$?"
                               ls -A $M""")
    lines = proc.stdout.splitlines()
    assert lines == ["rc=1"], proc.stdout + proc.stderr  # and the tmpfs is empty
    assert proc.stderr.startswith("internlm-ckpt: error: no space left on ") and proc.stderr.count("\n") == 1
    assert "/out:" in proc.stderr


FILL = """
import os, sys
from collections.abc import Mapping
from pathlib import Path
from adapter.checkpoint.convert import open_checkpoint, target_layout, write_checkpoint
mount, fmt = Path(sys.argv[1]), sys.argv[2]
src = open_checkpoint(sys.argv[3])

class Filling(Mapping):
    '''The source, but its first read fills the disk, as another program writing there would.'''
    def __init__(self, inner):
        self.inner, self.filled = inner, False
    def __getitem__(self, key):
        if not self.filled:
            self.filled = True
            fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                while True:
                    os.write(fd, bytes(1 << 16))
            except OSError:
                os.close(fd)
        return self.inner[key]
    def __iter__(self):
        return iter(self.inner)
    def __len__(self):
        return len(self.inner)
    def meta(self, key):
        return self.inner.meta(key)

src.tensors = Filling(src.tensors)
layout = target_layout(src.model, 1, 1, 1) if fmt in ("internevo", "mcore-legacy") else None
try:
    write_checkpoint(src, fmt, mount / "out", layout)
except OSError as exc:
    print(type(exc).__name__, exc)
os.remove(mount / "filler")
print(sorted(os.listdir(mount)))
"""


@pytest.mark.parametrize("fmt", ["internevo", "mcore", "mcore-legacy", "hf"])
def test_a_disk_filling_up_while_writing_is_named_and_cleaned(tmp_path, fmt):
    """After the check passed: torch's zip writer must not abort the process (std::terminate, rc 134)."""
    script = tmp_path / "fill.py"
    script.write_text(FILL)
    proc = in_small_tmpfs(f"{sys.executable} {script} $M {fmt} {SRC}", size="4m")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("NoSpaceError no space left on /") and lines[1] == "[]", lines
