"""Batches pinned bit for bit: sha256 digests of the batch stream on the shipped and the fixtures' data.

The digests were computed with the per-sample implementation whose first batches equal InternEvo's own (see
``test_data.test_first_batch_equals_internevo`` and the trajectory fixtures' ``batches.pt``), before the index
structures became numpy arrays, so any rewrite of packing, sampling or collation has to reproduce every byte:
token ids, labels, positions, type ids, ``cu_seqlens`` (stacked or ragged), dtypes, shapes and batch counts,
across epoch boundaries, data-parallel ranks, ramp-up, ``min_length``, unpacked rows and ``pack_sample_into_one``.
"""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from adapter.config import read_config
from adapter.data.loader import build_train_batches
from tests.conftest import CONFIGS, FIXTURES, REPO

FIXTURE_FOLDER_ORDER = ["en", "code"]  # the order InternEvo's machine listed the type folders in


def digest(batches, count: int) -> str:
    """sha256 over ``count`` ``(batch_count, batch)`` items: every key, dtype, shape and byte."""
    h = hashlib.sha256()
    for _ in range(count):
        batch_count, batch = next(batches)
        h.update(f"batch {batch_count}\n".encode())
        for key in sorted(batch):
            value = batch[key]
            tensors = value if isinstance(value, list) else [value]
            h.update(f"{key} {'list' if isinstance(value, list) else 'tensor'} {len(tensors)}\n".encode())
            for t in tensors:
                h.update(f"{t.dtype} {tuple(t.shape)}\n".encode())
                h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


# name: (config, working directory, folder order, data-section changes, dp size, ranks, batches per rank)
CASES = {
    "tiny-packed": (CONFIGS / "tiny.py", REPO, None, {}, 1, (0,), 300),  # 231 batches an epoch
    "tiny-dp2": (CONFIGS / "tiny.py", REPO, None, {}, 2, (0, 1), 130),
    "tiny-unpacked": (CONFIGS / "tiny.py", REPO, None, {"use_packed_dataset": False}, 1, (0,), 60),
    "tiny-into-one": (CONFIGS / "tiny.py", REPO, None, {"pack_sample_into_one": True}, 1, (0,), 60),
    "tiny-rampup-minlen": (CONFIGS / "tiny.py", REPO, None, {"rampup_batch_size": (2, 1, 2), "min_length": 300,
                                                             "seed": 7}, 2, (0, 1), 80),
    "tiny-synthetic": (CONFIGS / "tiny.py", REPO, None, {"train_folder": None}, 1, (0,), 3),
    "fixture-packed": (FIXTURES / "internlm1_tiny" / "config.py", FIXTURES / "internlm1_tiny", FIXTURE_FOLDER_ORDER,
                       {"use_packed_dataset": True}, 1, (0,), 40),  # 14 batches an epoch
    "fixture-unpacked": (FIXTURES / "internlm1_tiny" / "config.py", FIXTURES / "internlm1_tiny",
                         FIXTURE_FOLDER_ORDER, {"use_packed_dataset": False}, 1, (0,), 40),
    "traj-dp1": (FIXTURES / "internlm2_traj_dp1" / "config.py", FIXTURES / "internlm2_traj_dp1", None, {}, 1, (0,),
                 40),
    "traj-zero2": (FIXTURES / "internlm2_traj_zero2" / "config.py", FIXTURES / "internlm2_traj_zero2", None, {}, 2,
                   (0, 1), 30),
}

PINNED = {
    'fixture-packed': ['fab2581c98fccf9b62d31cabce911793a181a73428960413771d0062f976655d'],
    'fixture-unpacked': ['b3b2674d5489ae46fb9f6594e58e639eb163ea70543f3953d5d42001192d3814'],
    'tiny-dp2': ['26f64e850c25212350b09d15b6bf6664f5f38005b89d59f8c907a222f20d3caf',
                 'f6d8020342c884d29b313c6f11c649a3878fde8fe36586d17ed33ea3bdc0d5d2'],
    'tiny-into-one': ['86c0e9b376aca623f14b9a8508b9f44945a7ece753a435649f74bacfa2183923'],
    'tiny-packed': ['9134d92f4a52f4295583928391aa94f6f969a703fd6047e37f9933218d73485b'],
    'tiny-rampup-minlen': ['e05bb654e09bd8bcbf3bdfddf2e6ae441d8e8dd3f77ff4de6a563639f0a25f4e',
                           'e94c03c4b2c352afa5f0a11a1038a65e926de7c416b902258ca1bb18ee8f83c1'],
    'tiny-synthetic': ['9a39981f57827a7e64378bbcef01e4789e39ac518a3bf731b63053d39610feea'],
    'tiny-unpacked': ['5aee269ce94c28d797d0d1f279db429dc73d135e130ba90465262ef19b384d8d'],
    'traj-dp1': ['21072a00a2b282d0ca5aec2dac67808bc72527a88fba369e76c146e74dcf1abb'],
    'traj-zero2': ['de29048f83c806f697ab46f2649104bda372568d92b033799af9f935d3b6fd73',
                   'c8b4addfc179959a462765ff035f87bf92c548db53abdc9505704428fa4ff438'],
}


def case_digests(monkeypatch, name: str) -> list[str]:
    config, cwd, order, changes, dp_size, ranks, count = CASES[name]
    cfg, _ = read_config(config)
    monkeypatch.chdir(cwd)  # train_folder is relative to the run's directory, as in InternEvo
    data = dataclasses.replace(cfg.data, **changes)
    return [digest(build_train_batches(data, rank, dp_size, folder_order=order)[1], count) for rank in ranks]


@pytest.mark.parametrize("name", sorted(CASES))
def test_batches_are_pinned(monkeypatch, name):
    assert case_digests(monkeypatch, name) == PINNED[name]
