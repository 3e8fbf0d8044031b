"""Property: however a config is mutated, the translator raises ConfigError or produces valid outputs.

Starting from valid configs, hypothesis deletes keys, replaces values with values of any type, and adds
keys; the whole pipeline (normalise, validate, every output including megatron-core's own
``TransformerConfig`` validation) must either succeed or raise ``ConfigError``, never anything else.
"""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from adapter.config import ConfigError, RawConfig, normalize, validate
from adapter.config.convert import render
from tests.conftest import base_sections

VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=70),
    st.sampled_from([2**31, 10**12, 4096, 103168, 92544, 1024]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "torch.bfloat16", "torch.float16", "torch.tf32", "msp", "isp", "1 2 3", "0-3,5",
                     "local:/tmp/x", "boto3:s3://b.1.2.3.4/k", "INTERNLM2_PUBLIC", "rmsnorm", "x"]),
    st.lists(st.integers(min_value=0, max_value=4), max_size=3),
    st.dictionaries(st.sampled_from(["size", "mode", "fsdp", "interleaved_overlap", "path", "x"]),
                    st.one_of(st.integers(min_value=-1, max_value=8), st.booleans(), st.sampled_from(["mtp", "msp"])),
                    max_size=3),
)


def _nearby(draw, old):
    """A value of the same kind as ``old``: most mutations should still be plausible configs."""
    if isinstance(old, bool):
        return not old
    if isinstance(old, int):
        return draw(st.integers(min_value=-1, max_value=max(8, 2 * old + 2)))
    if isinstance(old, float):
        return draw(st.floats(min_value=0.0, max_value=2 * old + 1.0))
    return draw(VALUES)


def _get(values, path):
    node = values
    for part in path.split("."):
        node = node[part]
    return node


def _paths(node, prefix=""):
    for key, value in node.items():
        yield prefix + key
        if isinstance(value, dict):
            yield from _paths(value, prefix + key + ".")


def _set(values, path, value):
    *parents, last = path.split(".")
    node = values
    for part in parents:
        node = node[part]
    if value is _DELETE:
        node.pop(last, None)
    else:
        node[last] = value


_DELETE = object()


@st.composite
def mutated(draw):
    base = base_sections()
    if draw(st.booleans()):
        base["model_type"] = "INTERNLM2_PUBLIC"
        base["model"]["num_kv_attention_heads"] = 2
    if draw(st.booleans()):
        base["parallel"]["pipeline"] = dict(size=2, interleaved_overlap=True)
        base["model"]["num_chunks"] = draw(st.sampled_from([1, 2]))
    values = copy.deepcopy(base)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = sorted(_paths(values))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["nearby", "nearby", "nearby", "replace", "delete", "add"]))
        try:
            if action == "delete":
                _set(values, path, _DELETE)
            elif action == "add":
                parent = path.rsplit(".", 1)[0] if "." in path else ""
                key = draw(st.sampled_from(["size", "mode", "num_chunks", "checkpoint", "no_bias", "zero1", "bogus",
                                            "rope_base", "micro_num", "tensor", "sequence_parallel", "dtype"]))
                _set(values, f"{parent}.{key}" if parent else key, draw(VALUES))
            elif action == "nearby":
                _set(values, path, _nearby(draw, _get(values, path)))
            else:
                _set(values, path, draw(VALUES))
        except (KeyError, TypeError):  # the parent was replaced by a non-dict in an earlier step
            pass
    world = draw(st.one_of(st.none(), st.integers(min_value=-1, max_value=16)))
    return values, world


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutations_raise_only_config_errors(case):
    values, world = case
    try:
        cfg = normalize(RawConfig(values, "mutated.py", {}))
        layout = validate(cfg, world)
        files = render(cfg, layout)
    except ConfigError as exc:
        assert str(exc)  # a message, naming a field or the file
        event(f"ConfigError: {exc.field.split('.')[0] or 'file'}")
        return
    event("translated")
    ds = json.loads(files["ds_config.json"])
    assert ds["zero_optimization"]["stage"] == 1 and ds["gradient_accumulation_steps"] == 1
    report = json.loads(files["report.json"])
    assert {f["path"] for f in report["fields"]} == set(cfg.given)
    assert all(f["status"] in ("exact", "approximate", "unsupported") for f in report["fields"])
