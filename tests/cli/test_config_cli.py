"""``internlm-config`` as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys


from adapter.atomic import MARKER
from tests.conftest import CONFIGS, FIXTURES, REPO, base_sections, render_sections

CLI = [sys.executable, "-m", "adapter.cli.config"]


def run(*args, cwd=None):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd or REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_help_teaches():
    out = run("--help").stdout
    assert "--trust-config" not in out or "execute" in out
    assert "examples:" in out and "internlm-config convert" in out and "report.md" in out
    assert "check" in run("check", "--help").stdout


def test_check_is_fast_and_imports_no_framework(make_config):
    path = make_config(base_sections())
    code = ("import sys; from adapter.cli.config import main; rc = main(['check', %r, '--world-size', '4']); "
            "heavy = [m for m in ('torch', 'megatron', 'deepspeed') if m in sys.modules]; "
            "print('heavy:', heavy); sys.exit(rc)") % str(path)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "ok: " in proc.stdout and "dp=4" in proc.stdout and "heavy: []" in proc.stdout


def test_check_json(make_config):
    s = base_sections()
    s["parallel"]["pipeline"] = dict(size=2, interleaved_overlap=True)
    s["model"].update(num_chunks=2, num_layers=6)
    proc = run("check", make_config(s), "--nodes", "2", "--gpus-per-node", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["layers"] == [[[0, 1], [3, 4]], [[1, 3], [4, 6]]] and out["data"] == 4


def test_errors_exit_2_with_message_not_traceback(make_config):
    s = base_sections()
    s["parallel"]["zero1"] = 3
    proc = run("check", make_config(s), "--world-size", "4")
    assert proc.returncode == 2
    assert "parallel.zero1: zero1=3 must divide the data-parallel size 4" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("convert", "no/such/file.py")
    assert proc.returncode == 2 and "config file not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("check", make_config(s), "--nodes", "2")
    assert proc.returncode == 2 and "--nodes and --gpus-per-node go together" in proc.stderr


def test_convert_writes_all_outputs_atomically(make_config, tmp_path):
    path = make_config(base_sections())
    out = tmp_path / "out"
    proc = run("convert", path, "--world-size", "2", "--out", out, "--dry-run")
    assert proc.returncode == 0 and not out.exists() and "ds_config.json" in proc.stdout
    proc = run("convert", path, "--world-size", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out) and proc.stderr == ""  # quiet by default
    names = sorted(p.name for p in out.iterdir() if p.name != MARKER)
    assert names == ["ds_config.json", "megatron_args.txt", "report.json", "report.md", "transformer_config.yaml"]
    assert json.loads((out / MARKER).read_text())["files"] == names  # what --overwrite may replace
    assert json.loads((out / "ds_config.json").read_text())["train_batch_size"] == 16
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    # an existing non-empty output is refused and left untouched
    proc = run("convert", path, "--world-size", "4", "--out", out)
    assert proc.returncode == 1 and "--overwrite" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a failing conversion leaves neither output nor temporary folders behind
    bad = base_sections()
    bad["model"]["hidden_size"] = 66
    proc = run("convert", make_config(bad), "--out", tmp_path / "bad")
    assert proc.returncode == 2 and not (tmp_path / "bad").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # --overwrite replaces it
    proc = run("convert", path, "--world-size", "4", "--out", out, "--overwrite", "-v")
    assert proc.returncode == 0 and "exact" in proc.stderr
    assert json.loads((out / "ds_config.json").read_text())["train_batch_size"] == 32


def test_inputs_are_never_modified(tmp_path):
    src = CONFIGS / "7B_demo.py"
    before = src.read_bytes()
    proc = run("convert", src, "--world-size", "8", "--out", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr
    assert src.read_bytes() == before


def test_internevo_llama2_config(tmp_path):
    """InternEvo's own LLAMA2 fixture config, as a user would pass it."""
    config = FIXTURES / "llama2_tiny" / "config.py"
    proc = run("check", config, "--world-size", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["family"] == "llama2"
    proc = run("convert", config, "--world-size", "2", "--out", tmp_path / "llama2")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "llama2" / "report.json").read_text())
    assert report["family"] == "llama2" and report["layout"]["data"] == 2
    assert "--add-qkv-bias" in (tmp_path / "llama2" / "megatron_args.txt").read_text().splitlines()


def test_convert_never_deletes_the_users_files(tmp_path):
    """The issue's cases: --out the config's own folder (with --overwrite), '.', a symlink to it, and a
    folder around it are refused with exit 2; a folder we did not write is never replaced."""
    home = tmp_path / "owtest"
    (home / "data").mkdir(parents=True)
    config = home / "my_config.py"
    config.write_text(render_sections(base_sections()))
    (home / "notes.md").write_text("notes")
    (home / "data" / "train.bin").write_bytes(b"tokens")
    (tmp_path / "link").symlink_to(home)
    before = {p: p.read_bytes() for p in home.rglob("*") if p.is_file()}
    for out, cwd, extra in ((home, None, "--overwrite"), (".", home, "--overwrite"), (".", home, "--dry-run"),
                            (tmp_path / "link", None, "--overwrite"), (tmp_path, None, "--overwrite"),
                            ("link/.", tmp_path, "--dry-run"), ("../../owtest", home / "data", "--overwrite")):
        proc = run("convert", config, "--out", out, extra, cwd=cwd)
        assert proc.returncode == 2, (out, extra, proc.stderr)
        assert "holds the input" in proc.stderr and proc.stderr.count("\n") == 1
    assert {p: p.read_bytes() for p in home.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "owtest"] and list(home.glob(".*")) == []
    # a folder beside the config is fine, and --out . from an empty folder too
    assert run("convert", config, "--out", home / "converted").returncode == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run("convert", config, "--out", ".", cwd=empty)
    assert proc.returncode == 0, proc.stderr
    assert (empty / "ds_config.json").exists() and list(tmp_path.glob(".*")) == []
    # someone else's folder is not replaced by --overwrite
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "ds_config.json").write_text("hand-tuned")
    proc = run("convert", config, "--out", theirs, "--overwrite")
    assert proc.returncode == 1 and "not written by internlm-adapter" in proc.stderr
    assert (theirs / "ds_config.json").read_text() == "hand-tuned"


def test_sizes_must_be_positive(make_config):
    path = make_config(base_sections())
    for args in (("--world-size", "0"), ("--world-size", "-8"), ("--nodes", "0", "--gpus-per-node", "8")):
        proc = run("check", path, *args)
        assert proc.returncode == 2 and "positive integer" in proc.stderr, args


def test_a_closed_pipe_is_not_an_error(make_config):
    """``internlm-config check --json | head -c0``: the reader is gone before we print."""
    proc = subprocess.Popen([*CLI, "check", str(make_config(base_sections())), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    proc.stdout.close()
    assert proc.wait() == 0 and proc.stderr.read() == b""
