"""The training entry point under the real deepspeed launcher, on the tiny config and shipped dataset."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from adapter.checkpoint.convert import compare, open_checkpoint
from tests.conftest import CONFIGS, REPO
from tests.spawn import free_port


@pytest.mark.multiproc
@pytest.mark.slow
def test_deepspeed_launcher_trains_tiny_config(tmp_path):
    config = tmp_path / "tiny.py"
    text = (CONFIGS / "tiny.py").read_text()
    text = text.replace('save_ckpt_folder="local:runs/tiny/ckpt"', f'save_ckpt_folder="local:{tmp_path}/ckpt"')
    text = text.replace("checkpoint_every=20", "checkpoint_every=3")
    text = text.replace('train_folder="launch/data/tiny"', f'train_folder="{REPO}/launch/data/tiny"')
    text = text.replace("valid_every=0", "valid_every=3").replace("valid_folder=None",
                                                                  f'valid_folder="{REPO}/launch/data/tiny"')
    config.write_text(text)
    deepspeed = shutil.which("deepspeed", path=os.path.dirname(sys.executable))
    assert deepspeed, "the deepspeed launcher is installed with the package"
    proc = subprocess.run(
        [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "launch" / "train.py"),
         "--config", str(config), "--max-steps", "6", "--tensorboard-dir", str(tmp_path / "tb")],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(m) for m in re.findall(r"step +\d+ loss=([0-9.]+)", proc.stdout)]
    assert len(losses) == 6 and losses[-1] < losses[0]  # printed once (log rank), and falling
    valid = [float(m) for m in re.findall(r"valid/code/loss=([0-9.]+)", proc.stdout)]
    assert len(valid) == 2 and valid[1] < valid[0]  # validation at steps 3 and 6, on the code set
    assert list((tmp_path / "tb").iterdir())  # TensorBoard events
    first, second = open_checkpoint(tmp_path / "ckpt" / "3"), open_checkpoint(tmp_path / "ckpt" / "6")
    assert (first.layout.pp, first.layout.vpp, first.model.family) == (2, 2, "internlm1")
    assert (tmp_path / "ckpt" / "6" / "6.step").exists()
    assert compare(first, second)  # training moved the weights


def _single_process_config(tmp_path, *replacements) -> None:
    """The tiny config on one process (no pipeline), saving under ``tmp_path``, written to ``tmp_path/cfg.py``."""
    text = (CONFIGS / "tiny.py").read_text()
    for old, new in (('save_ckpt_folder="local:runs/tiny/ckpt"', f'save_ckpt_folder="local:{tmp_path}/ckpt"'),
                     ('train_folder="launch/data/tiny"', f'train_folder="{REPO}/launch/data/tiny"'),
                     ("pipeline=dict(size=2", "pipeline=dict(size=1"), ("num_chunks=2", "num_chunks=1"),
                     *replacements):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    (tmp_path / "cfg.py").write_text(text)


def _train_one_process(tmp_path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    return subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config", str(tmp_path / "cfg.py"),
                           *map(str, args)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


@pytest.mark.multiproc
def test_bad_data_fails_in_one_line(tmp_path):
    """Token ids the model's vocabulary cannot embed stop the run with one line naming the file and byte (no
    traceback), exit status 1: here the shipped byte-level data against a 100-token vocabulary."""
    _single_process_config(tmp_path, ("VOCAB_SIZE = 264", "VOCAB_SIZE = 100"))
    proc = _train_one_process(tmp_path)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train: error")]
    assert len(errors) == 1 and re.search(r"train_000\.bin: byte \d+: token id \d+ is outside the model's "
                                          r"vocabulary \(model\.vocab_size=100\)", errors[0]), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.multiproc
def test_an_unexpected_error_is_one_line_and_its_traceback_goes_to_the_run_folder(tmp_path):
    """A component failing in a way nobody anticipated (here TensorBoard's writer, given a TensorBoard folder that
    is a file): one line naming the rank, the exception and the log file, exit 1, no traceback on stderr; the
    log holds the traceback down to the raising frame."""
    pytest.importorskip("tensorboard")
    _single_process_config(tmp_path)
    (tmp_path / "tb").write_text("a file, not a folder")
    proc = _train_one_process(tmp_path, "--tensorboard-dir", tmp_path / "tb", "--run-dir", tmp_path / "run",
                              "--max-steps", "1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    log = tmp_path / "run" / "error_rank0.log"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train:")]
    assert errors == [f"train: error (rank 0): unexpected FileExistsError: [Errno 17] File exists: "
                      f"'{tmp_path / 'tb'}' (traceback in {log})"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "step" not in proc.stdout
    text = log.read_text()
    assert text.startswith("Traceback (most recent call last):") and "SummaryWriter(folder)" in text
    assert text.rstrip().endswith(f"FileExistsError: [Errno 17] File exists: '{tmp_path / 'tb'}'")
