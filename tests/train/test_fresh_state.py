"""Adam's state made for a load (``optimizer_state._fresh_state``) is zero where no parameter's part lies (the
partition's padding, which the load never writes) and left for the load everywhere else."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from adapter.train import optimizer_state


def _param(start: int, numel: int) -> SimpleNamespace:
    """A parameter as DeepSpeed links it to this rank's partition: its part's place there."""
    return SimpleNamespace(_hp_mapping=SimpleNamespace(hp_fragment_address=SimpleNamespace(start=start, numel=numel)))


def _nan_memory(monkeypatch) -> None:
    """Uninitialised memory stands in as NaN, so a gap left unzeroed (or a part zeroed) shows."""
    monkeypatch.setattr(optimizer_state, "empty_to_fill", lambda shape, dtype, device: torch.full(shape, float("nan")))


def test_only_the_padding_is_zeroed(monkeypatch):
    _nan_memory(monkeypatch)
    flat = torch.zeros(16)
    params = [_param(8, 4), SimpleNamespace(_hp_mapping=None), _param(2, 3)]  # one held by another rank
    state = optimizer_state._fresh_state(flat, params)
    padding = torch.zeros(16, dtype=torch.bool)
    padding[[0, 1, 5, 6, 7, 12, 13, 14, 15]] = True
    assert torch.equal(state[padding], torch.zeros(9))
    assert state[~padding].isnan().all()


def test_without_deepspeed_links_everything_is_zeroed(monkeypatch):
    _nan_memory(monkeypatch)
    state = optimizer_state._fresh_state(torch.zeros(6), [_param(0, 3), SimpleNamespace()])
    assert torch.equal(state, torch.zeros(6))
