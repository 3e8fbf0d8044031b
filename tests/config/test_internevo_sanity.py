"""The normaliser against InternEvo 0.5.2's own ``args_sanity_check``.

``tests/fixtures/internevo/args_sanity_check.json`` holds what InternEvo's check made of every config in this
repository (the demo configs, the tiny ones, each fixture's) and of the variants of the 7B demo in
``config_variants.py`` (other spellings and values of zero1, tensor and pipeline parallelism, dtype,
activation checkpointing, saving and ``adapt_hf``): the checked ``gpc.config``, or InternEvo's refusal
(written by ``gen_sanity.py`` beside it, with the InternEvo wheel). Every field the adapter reads into
its typed config must come out as InternEvo's check leaves it, up to the spellings named in ``SAME``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from adapter.config import fields, read_config
from adapter.config.report import report_dict
from tests.conftest import FIXTURES, REPO
from tests.fixtures.internevo.config_variants import VARIANTS, write_variants

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


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    """Each checked config's file: the repository's, and the variants written out as ``gen_sanity.py`` did."""
    out = {name: REPO / name for name in CHECKED if not name.startswith("variants/")}
    variants = write_variants(tmp_path_factory.mktemp("variants"))
    out.update((f"variants/{name}", path) for name, path in variants.items())
    return out


def test_every_config_here_was_checked(paths):
    configs = sorted(str(p.relative_to(REPO)) for p in [*(REPO / "internlm_configs").glob("*.py"),
                                                         *FIXTURES.glob("*/config.py")])
    assert sorted(CHECKED) == sorted(configs + [f"variants/{name}" for name in VARIANTS]) == sorted(paths)


def _legacy_sequence_parallel(cfg, layout) -> bool:
    """The one place the adapter reads a config otherwise, on purpose: the 2023 top-level
    ``sequence_parallel=True`` beside a tensor size without a mode. InternEvo's check makes the mode 'mtp' (no
    sequence parallelism, though its schedulers still read the flag); the adapter takes the flag to mean
    'msp'. Its report must say so."""
    if cfg.given.get("parallel.sequence_parallel") is not True or "parallel.tensor.mode" in cfg.given:
        return False
    row = next(r for r in report_dict(cfg, layout)["fields"] if r["path"] == "parallel.sequence_parallel")
    assert row["status"] == "approximate" and "sets the mode to 'mtp'" in row["note"], row
    return True


@pytest.mark.parametrize("name", sorted(k for k, v in CHECKED.items() if "error" not in v))
def test_fields_equal_internevos_checked_config(name, paths):
    cfg, layout = read_config(paths[name])
    theirs = CHECKED[name]
    legacy = _legacy_sequence_parallel(cfg, layout)
    compared = 0
    for f in fields.FIELDS:
        if f.kind is None or not f.into:
            continue
        value = _lookup(theirs, f.path)
        if value is KeyError:  # a default InternEvo applies where it uses the key, not in its check
            continue
        ours = _typed(cfg, f.into)
        if legacy and f.path == "parallel.tensor.mode":
            assert (value, ours) == ("mtp", "msp")
            continue
        expected = SAME.get((f.path, value), value) if isinstance(value, (str, float)) else value
        if isinstance(ours, tuple) and isinstance(expected, list):
            expected = tuple(expected)
        assert ours == expected, f"{name}: {f.path}: InternEvo's check gives {value!r}, the adapter {ours!r}"
        compared += 1
    assert compared >= 60  # most of the table, not a handful that happened to match


@pytest.mark.parametrize("name", sorted(k for k, v in CHECKED.items() if "error" in v))
def test_configs_internevo_refuses_are_reported_as_such(name, paths):
    """InternEvo refuses these (flash attention off with packed data, which the adapter runs with torch SDPA
    over the same cu_seqlens segments): the adapter trains them, and its report says InternEvo would not."""
    assert "use_packed_dataset should be set same value as use_flash_attn" in CHECKED[name]["error"]
    cfg, layout = read_config(paths[name])
    row = next(r for r in report_dict(cfg, layout)["fields"] if r["path"] == "model.use_flash_attn")
    assert "InternEvo 0.5.2 refuses use_flash_attn=False with data.use_packed_dataset=True" in row["note"]
