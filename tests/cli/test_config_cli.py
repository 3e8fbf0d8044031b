"""``internlm-config`` as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys


from tests.conftest import CONFIGS, FIXTURES, REPO, base_sections

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
    names = sorted(p.name for p in out.iterdir())
    assert names == ["ds_config.json", "megatron_args.txt", "report.json", "report.md", "transformer_config.yaml"]
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
