"""The safe evaluator under attack: values that would take minutes or gigabytes are refused fast, in one
short message; what Python refuses is refused, what Python accepts is accepted.

Each case runs under a time limit, and the property test (hypothesis) builds random programs from the
growth operations (squaring, doubling, repetition, nesting, joins, format widths): whatever they compute,
loading ends within the time limit with a value or a ``ConfigError`` whose message is short.
"""

from __future__ import annotations

import resource
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter.config import ConfigError
from adapter.config.bounds import MAX_SIZE
from adapter.config.errors import MAX_MESSAGE
from adapter.config.load import load_config

SECONDS = 5.0


def _load(path):
    start = time.monotonic()
    try:
        return load_config(path), None
    except ConfigError as exc:
        return None, exc
    finally:
        assert time.monotonic() - start < SECONDS


HOSTILE = [
    ("X = 10 ** 300\nX = X * X\nX = X * X\nX = X * X\nX = X * X\nX = X * X\nX = X * X\n", "bits"),
    ("X = 2 ** 100000\n", "bits"),
    ('X = "ab"\n' + "X = X + X\n" * 40, "elements or characters"),
    ("X = [0]\n" + "X = X + X\n" * 40, "elements or characters"),
    ('X = "x" * 10**7\n', "elements or characters"),
    ("A = [0] * 1000\nB = [A] * 1000\nJOB_NAME = [B] * 1000\n", "elements or characters"),
    ("X = " + "+".join(["1"] * 300_000) + "\n", "nested deeper"),
    ("X = " + "[" * 150 + "]" * 150 + "\n", "nested deeper"),
    ('X = f"{1:>2000000000}"\n', "format width"),
    ('X = "%2000000000d" % 1\n', "format width"),
    ('X = "%*d" % (2000000000, 1)\n', "`*` width"),
    ("X = round(1, -10**9)\n", "round()"),
    ('S = "x" * 100000\nX = S.join(["a"] * 1000)\n', "join"),
    ('X = "x" * 999_000\n' + "".join(f"Y{i} = X + 'y'\n" for i in range(60)), "in all"),
]


@pytest.mark.parametrize("code,what", HOSTILE, ids=[f"{i}:{w}" for i, (_, w) in enumerate(HOSTILE)])
def test_hostile_sizes_are_refused_fast_and_briefly(write_config, code, what):
    path = write_config(code)
    values, error = _load(path)
    assert values is None and what in str(error), str(error)[:300]
    assert len(str(error)) < 400 and "\n" not in str(error)


BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
JOB_NAME: [*i, *i, *i, *i, *i, *i, *i, *i, *i]
"""


def test_yaml_billion_laughs_and_cycles_are_refused(write_config):
    values, error = _load(write_config(BILLION_LAUGHS, "laughs.yaml"))
    assert values is None and "elements or characters" in str(error)
    values, error = _load(write_config("JOB_NAME: &x [1, *x]\n", "cycle.yaml"))
    assert values is None and "contains itself" in str(error)
    values, error = _load(write_config("a: &a [1, 2]\nb: [*a, *a]\n", "ok.yaml"))  # aliases as such are fine
    assert error is None and values.values["b"] == [[1, 2], [1, 2]]


def test_python_rules_on_keywords_and_bom(write_config, tmp_path):
    values, error = _load(write_config("model = dict(a=1, a=2)\n"))
    assert values is None and "keyword argument 'a' given twice" in str(error) and ":1:" in str(error)
    values, error = _load(write_config('base = dict(a=1)\nmodel = dict(a=2, **base)\n'))
    assert values is None and "given twice" in str(error) and ":2:" in str(error)
    values, error = _load(write_config('model = {"a": 1, "a": 2}\n'))  # a dict display keeps the last, as Python
    assert error is None and values.values["model"] == {"a": 2}
    bom = tmp_path / "bom.py"
    bom.write_bytes(b"\xef\xbb\xbfJOB_NAME = 'x'\nmodel = dict(a=1)\n")
    compile(bom.read_bytes(), str(bom), "exec")  # Python accepts it
    values, error = _load(bom)
    assert error is None and values.values == {"JOB_NAME": "x", "model": {"a": 1}} and values.lines["model"] == 2
    yaml_bom = tmp_path / "bom.yaml"
    yaml_bom.write_bytes(b"\xef\xbb\xbfJOB_NAME: x\n")
    assert _load(yaml_bom)[0].values == {"JOB_NAME": "x"}


def test_messages_never_quote_an_unbounded_value(write_config):
    """A value at the size limit reaches the schema checks, whose messages quote it: they are cut."""
    values, error = _load(write_config(f"JOB_NAME = [0] * {MAX_SIZE - 10}\n"))
    assert error is None
    from adapter.config import read_config

    path = write_config(f"JOB_NAME = [0] * {MAX_SIZE - 10}\nmodel = dict(num_layers=2)\n", "big.py")
    with pytest.raises(ConfigError) as info:
        read_config(path)
    assert len(str(info.value)) <= MAX_MESSAGE + len(str(path)) + 40


def test_real_configs_stay_far_inside_the_bounds():
    from tests.conftest import CONFIGS

    for path in sorted(CONFIGS.iterdir()):
        if path.suffix in (".py", ".yaml"):
            values, error = _load(path)
            assert error is None, error


GROW = st.sampled_from(["X = X * X", "X = X + X", "X = [X] * 1000", "X = [X, X, X]", "X = str(X) * 3",
                        "X = X ** 3", 'X = f"{X:>{N}}"', 'X = ",".join([str(X)] * N)', "X = (X, X)",
                        "N = N * 1000", "X = {'a': X, 'b': X}", "X = len(str(X))", "X = round(1.5, N)"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.sampled_from(["7", "'ab'", "[1, 2]", "2.5", "10 ** 30"]), steps=st.lists(GROW, max_size=12))
def test_property_evaluation_is_bounded(write_config, start, steps):
    """Whatever the program grows, loading ends fast with a value within the bounds, or a short ConfigError;
    memory stays bounded too (the peak resident size grows by less than 1 GiB)."""
    code = f"N = 3\nX = {start}\n" + "".join(f"{s}\n" for s in steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    values, error = _load(write_config(code))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 2**20  # KiB
    if error is not None:
        assert len(str(error)) < 400
    else:
        x = values.values["X"]
        assert not isinstance(x, int) or x.bit_length() <= 1024
        assert len(repr(x)) < 50 * MAX_SIZE
