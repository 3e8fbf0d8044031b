"""The safe config loader: evaluates what real configs use, refuses everything else with file:line."""

from __future__ import annotations

import pytest

from adapter.config.errors import ConfigError
from adapter.config.load import load_config


def test_evaluates_the_subset_real_configs_use(write_config, monkeypatch):
    monkeypatch.setenv("BOTO3_IP", "10.1.2.3")
    path = write_config('''
        """A docstring block, as in the seed configs."""
        import os
        JOB_NAME = "7b_train"
        CHECKPOINT_EVERY = 50
        BOTO3_IP = os.environ["BOTO3_IP"]
        SAVE = f"boto3:s3://model_weights.{BOTO3_IP}/internlm"
        ckpt = dict(
            save_ckpt_folder=SAVE,  # comment
            snapshot_ckpt_folder="/".join([SAVE, "snapshot"]),
            oss_snapshot_freq=int(CHECKPOINT_EVERY / 2),
            tmp=os.environ.get("NOT_SET_ANYWHERE", "/dev/shm"),
            other=os.getenv("BOTO3_IP"),
        )
        data = dict(total_steps=50000, micro_num=4, seq_len=2**11)
        lr_scheduler = {"total_steps": data["total_steps"], "warmup": max(1, min(10, 3)) * -1.5}
        parallel = dict(zero1=8, pipeline=dict(size=1, interleaved_overlap=True), sizes=(1, 2)[0:1])
        FLAG = True if data["micro_num"] > 2 and not False else None
        mlp = float(8 / 3) + abs(-1) + round(2.4) + len([1, 2])
        ''')
    raw = load_config(path)
    v = raw.values
    assert v["ckpt"]["save_ckpt_folder"] == "boto3:s3://model_weights.10.1.2.3/internlm"
    assert v["ckpt"]["snapshot_ckpt_folder"] == "boto3:s3://model_weights.10.1.2.3/internlm/snapshot"
    assert v["ckpt"]["oss_snapshot_freq"] == 25
    assert v["ckpt"]["tmp"] == "/dev/shm" and v["ckpt"]["other"] == "10.1.2.3"
    assert v["lr_scheduler"] == {"total_steps": 50000, "warmup": -4.5}
    assert v["data"]["seq_len"] == 2048
    assert v["parallel"]["pipeline"] == {"size": 1, "interleaved_overlap": True}
    assert v["parallel"]["sizes"] == (1,)
    assert v["FLAG"] is True
    assert v["mlp"] == pytest.approx(8 / 3 + 1 + 2 + 2)
    # lines of keys inside dict(...) calls, for located errors later
    assert raw.lines["ckpt"] == 7 and raw.lines["ckpt.oss_snapshot_freq"] == 10
    assert raw.line_of("parallel.pipeline.size") == raw.lines["parallel.pipeline.size"] == 16
    assert raw.line_of("data.no_such_key") == raw.lines["data"] == 14


@pytest.mark.parametrize("code, what", [
    ('X = __import__("os").system("touch {marker}")', "call"),
    ('X = open("{marker}", "w")', "call"),
    ("import subprocess", "import"),
    ("from os import system", "import"),
    ("X = (lambda: 1)()", "Lambda"),
    ("def f():\n    return 1", "FunctionDef"),
    ("for i in range(3):\n    pass", "For"),
    ("X = [i for i in (1, 2)]", "expression"),
    ('X = "a".upper()', "call"),
    ("X = (1).__class__", "attribute"),
    ("X = os.system('true')", "call"),
    ("a, b = 1, 2", "assignment"),
])
def test_refuses_everything_else_with_file_line_and_trust_hint(write_config, tmp_path, code, what):
    marker = tmp_path / "marker"
    path = write_config("import os\n" + code.format(marker=marker) + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:2:"), message
    assert "--trust-config" in message and what.lower() in message.lower()
    assert not marker.exists(), "the refused code must not have run"


def test_trust_config_executes_the_file_as_internevo_does(write_config, tmp_path):
    marker = tmp_path / "ran"
    path = write_config(f'''
        from pathlib import Path
        Path({str(marker)!r}).write_text("x")
        def helper(n):
            return n * 2
        model = dict(num_layers=helper(16))
        ''')
    with pytest.raises(ConfigError, match="not allowed"):
        load_config(path)
    assert not marker.exists()
    raw = load_config(path, trust=True)
    assert marker.exists()
    assert raw.values["model"] == {"num_layers": 32}
    assert "helper" not in raw.values and "Path" not in raw.values
    assert raw.lines["model.num_layers"] == 5


def test_errors_name_the_place(write_config, monkeypatch):
    monkeypatch.delenv("NO_SUCH_VAR", raising=False)
    path = write_config("import os\nA = 1\nB = os.environ['NO_SUCH_VAR']\n")
    with pytest.raises(ConfigError, match=r"cfg.py:3: B: environment variable NO_SUCH_VAR is not set"):
        load_config(path)
    path = write_config("A = 1\nB = C + 1\n")
    with pytest.raises(ConfigError, match=r"cfg.py:2: B: name `C` is not defined above this line"):
        load_config(path)
    path = write_config("A = dict(x=1)\nB = A['y']\n")
    with pytest.raises(ConfigError, match=r"cfg.py:2: B: .*KeyError"):
        load_config(path)
    path = write_config("A = (1\n")
    with pytest.raises(ConfigError, match=r"cfg.py:1: invalid Python"):
        load_config(path)
    path = write_config("A = 1 / 0\n")
    with pytest.raises(ConfigError, match=r"cfg.py:1: A: `1 / 0` failed: division by zero"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(path.parent / "missing.py")


def test_yaml_configs_are_read_with_lines(write_config):
    path = write_config("""
        model:
          num_layers: 4
          hidden_size: 64
        adam:
          lr: 1e-3
        """, name="cfg.yaml")
    raw = load_config(path)
    assert raw.values["model"] == {"num_layers": 4, "hidden_size": 64}
    assert raw.lines["model.hidden_size"] == 3 and raw.lines["adam"] == 4
    bad = write_config("model: [1, 2\n", name="bad.yml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    not_mapping = write_config("- 1\n- 2\n", name="list.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(not_mapping)
