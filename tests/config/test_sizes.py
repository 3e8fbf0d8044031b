"""Sizes no run can have are refused when the config is read, in one line naming the field.

The oracle for the rule is the tensor table the converters use (``adapter.weights.atoms``): a config passes
exactly when its fp32 weights, each micro-batch's activations and a step's token ids fit in 2^63 bytes and it
has at most a million layers.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter.config import ConfigError, RawConfig, normalize, read_config
from adapter.config.normalize import ffn_hidden_size, normalize_model
from adapter.weights import atoms
from tests.conftest import REPO, base_sections

LIMIT = 2**63 - 1


def _with(model=None, data=None, **top):
    s = base_sections()
    s["model"].update(model or {})
    s["data"].update(data or {})
    s.update(top)
    return s


@pytest.mark.parametrize("model, data, field, message", [
    (dict(num_layers=10**18), {}, "model.num_layers", "about 2\\^59 layers: at most 1,000,000"),
    (dict(num_layers=2**70), {}, "model.num_layers", "71 bits does not fit the signed 64-bit"),
    (dict(hidden_size=2**40), {}, "model.hidden_size", "about 2\\^85 parameters .* past 2\\^63 bytes"),
    (dict(vocab_size=2**60), {}, "model.vocab_size", "about 2\\^67 parameters"),
    (dict(mlp_ratio=2.0**60), {}, "model.mlp_ratio", "MLP about 2\\^66"),
    (dict(mlp_ratio=1e308), {}, "model.mlp_ratio", "overflows a float"),
    (dict(multiple_of=2**62), {}, "model.mlp_ratio", "past 2\\^63 bytes"),
    (dict(num_layers=10**6, hidden_size=2**27, num_attention_heads=4), {}, "model.num_layers", "about 2\\^77"),
    (dict(max_position_embeddings=2**61), {}, "model.max_position_embeddings", "rotary table"),
    ({}, dict(seq_len=2**60), "data.seq_len", "make MLP activations of about 2\\^61 × 256"),
    ({}, dict(micro_bsz=2**59), "data.micro_bsz", "make MLP activations"),
    ({}, dict(micro_num=2**58), "data.micro_num", "bytes of token ids"),
    ({}, dict(total_steps=2**64), "data.total_steps", "65 bits"),
])
def test_each_size_is_refused_naming_its_field(make_config, model, data, field, message):
    with pytest.raises(ConfigError, match=message) as info:
        read_config(make_config(_with(model, data)))
    assert info.value.field == field and info.value.line and "\n" not in str(info.value)


def test_the_issue_case_check_and_convert_exit_2_in_one_line(make_config, tmp_path):
    """``num_layers=10**18`` passed ``check`` and crashed ``convert`` with a MemoryError."""
    path = make_config(_with(dict(num_layers=10**18)))
    for args in (("check", path), ("convert", path, "--out", tmp_path / "out")):
        proc = subprocess.run([sys.executable, "-m", "adapter.cli.config", *map(str, args)], capture_output=True,
                              text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "model.num_layers: about 2^59 layers" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_checkpoints_model_config_is_bounded_too():
    """``model_config.pt`` and ``config.json`` go through the same rows: a folder cannot claim 10^18 layers."""
    model = dict(num_layers=10**18, hidden_size=64, num_attention_heads=4, vocab_size=128)
    with pytest.raises(ConfigError, match="model.num_layers: about 2\\^59 layers"):
        normalize_model("INTERNLM", model, "ckpt/model_config.pt")


@pytest.mark.parametrize("name, model", [
    ("InternLM2-20B", dict(num_layers=48, hidden_size=6144, num_attention_heads=48, num_kv_attention_heads=8,
                           vocab_size=92544, mlp_ratio=16384 / 6144)),
    ("Llama-2-70B", dict(num_layers=80, hidden_size=8192, num_attention_heads=64, num_kv_attention_heads=8,
                         vocab_size=32000, mlp_ratio=3.5)),
    ("a 2T dense model", dict(num_layers=200, hidden_size=32768, num_attention_heads=256, num_kv_attention_heads=8,
                              vocab_size=256000, mlp_ratio=4.0)),
])
def test_real_and_larger_models_pass(make_config, name, model):
    s = _with(model, dict(seq_len=32768, micro_bsz=1, micro_num=256), model_type="INTERNLM2_PUBLIC")
    cfg, _ = read_config(make_config(s))
    assert cfg.model.num_layers == model["num_layers"], name


BASE = normalize(RawConfig(base_sections(), "base.py", {}))


def _params(m) -> int:
    return sum(math.prod(atoms.shape(m, a)) for a in atoms.LAYER if atoms.present(m, a)) * m.num_layers + sum(
        math.prod(atoms.shape(m, a)) for a in atoms.EMBEDDING + atoms.FINAL if atoms.present(m, a))


def _pow(top: int, *edges: int):
    """Powers of two up to ``2**top`` (past 2^63 for some fields), or a value at a bound."""
    return st.one_of(st.integers(0, top).map(lambda k: 2**k), st.sampled_from(edges)) if edges else \
        st.integers(0, top).map(lambda k: 2**k)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=_pow(22, 10**6, 10**6 + 1, 2**63, 2**63 - 1), hidden=_pow(34), vocab=_pow(64),
       ratio=st.sampled_from([1.0, 8 / 3, 2.0**30, 2.0**62]), seq=_pow(40), bsz=_pow(24), num=_pow(40, 2**63 - 1),
       norm=st.sampled_from(["rmsnorm", "layernorm"]))
def test_property_a_config_passes_exactly_when_its_tensors_can_exist(make_config, layers, hidden, vocab, ratio, seq,
                                                                     bsz, num, norm):
    s = _with(dict(num_layers=layers, hidden_size=hidden, num_attention_heads=1, vocab_size=vocab, mlp_ratio=ratio,
                   multiple_of=1, norm_type=norm),
              dict(seq_len=seq, micro_bsz=bsz, micro_num=num, valid_micro_num=1))
    try:
        cfg, _ = read_config(make_config(s))
    except ConfigError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 600
        assert exc.field.startswith(("model.", "data.")), str(exc)
        assert not _fits(layers, hidden, vocab, ratio, seq, bsz, num, norm), str(exc)
        return
    m, d = cfg.model, cfg.data
    assert _fits(m.num_layers, m.hidden_size, m.vocab_size, m.mlp_ratio, d.seq_len, d.micro_bsz, d.micro_num,
                 m.norm_type)


def _fits(layers, hidden, vocab, ratio, seq, bsz, num, norm) -> bool:
    """The oracle: the atoms' shapes of this model, counted as the converters cut them."""
    if max(layers, hidden, vocab, seq, bsz, num) >= 2**63 or layers > 10**6:
        return False
    ffn = ffn_hidden_size(hidden, ratio, 1)
    m = dataclasses.replace(BASE.model, num_layers=layers, hidden_size=hidden, num_attention_heads=1,
                            num_kv_attention_heads=1, vocab_size=vocab, mlp_ratio=ratio, ffn_hidden_size=ffn,
                            multiple_of=1, norm_type=norm)
    tokens = seq * bsz
    return (_params(m) * 4 <= LIMIT and tokens * max(hidden, ffn, vocab) * 4 <= LIMIT
            and num * tokens * 8 <= LIMIT)
