"""The normaliser against InternEvo 0.5.2's own ``args_sanity_check``.

``tests/fixtures/internevo/args_sanity_check.json`` holds what InternEvo's check made of every config in this
repository (the demo configs, the tiny ones, each fixture's): the checked ``gpc.config``, or InternEvo's
refusal (written by ``gen_sanity.py`` beside it, with the InternEvo wheel). Every field the adapter reads into
its typed config must come out as InternEvo's check leaves it, up to the spellings named in ``SAME``.
"""

from __future__ import annotations

import json
import math

import pytest

from adapter.config import fields, read_config
from adapter.config.report import report_dict
from tests.conftest import FIXTURES, REPO

CHECKED = json.loads((FIXTURES / "args_sanity_check.json").read_text())

#: The same setting spelt two ways: InternEvo's value after its check → the adapter's typed value.
SAME = {
    ("ckpt.checkpoint_every", math.inf): None,  # never: InternEvo sets inf when saving is off
    ("ckpt.oss_snapshot_freq", math.inf): None,  # no snapshots
    ("data.rampup_batch_size", ""): None,  # no ramp-up
    ("data.skip_batches", ""): (),  # nothing skipped
}


def _lookup(tree: dict, path: str):
    for part in path.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return KeyError
        tree = tree[part]
    return tree


def _typed(cfg, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_every_config_here_was_checked():
    configs = sorted(str(p.relative_to(REPO)) for p in [*(REPO / "internlm_configs").glob("*.py"),
                                                         *FIXTURES.glob("*/config.py")])
    assert sorted(CHECKED) == configs


@pytest.mark.parametrize("name", sorted(k for k, v in CHECKED.items() if "error" not in v))
def test_fields_equal_internevos_checked_config(name):
    cfg, _ = read_config(REPO / name)
    theirs = CHECKED[name]
    compared = 0
    for f in fields.FIELDS:
        if f.kind is None or not f.into:
            continue
        value = _lookup(theirs, f.path)
        if value is KeyError:  # a default InternEvo applies where it uses the key, not in its check
            continue
        ours = _typed(cfg, f.into)
        expected = SAME.get((f.path, value), value) if isinstance(value, (str, float)) else value
        if isinstance(ours, tuple) and isinstance(expected, list):
            expected = tuple(expected)
        assert ours == expected, f"{name}: {f.path}: InternEvo's check gives {value!r}, the adapter {ours!r}"
        compared += 1
    assert compared >= 60  # most of the table, not a handful that happened to match


@pytest.mark.parametrize("name", sorted(k for k, v in CHECKED.items() if "error" in v))
def test_configs_internevo_refuses_are_reported_as_such(name):
    """InternEvo refuses these (flash attention off with packed data, which the adapter runs with torch SDPA
    over the same cu_seqlens segments): the adapter trains them, and its report says InternEvo would not."""
    assert "use_packed_dataset should be set same value as use_flash_attn" in CHECKED[name]["error"]
    cfg, layout = read_config(REPO / name)
    row = next(r for r in report_dict(cfg, layout)["fields"] if r["path"] == "model.use_flash_attn")
    assert "InternEvo 0.5.2 refuses use_flash_attn=False with data.use_packed_dataset=True" in row["note"]
