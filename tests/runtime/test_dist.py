"""``runtime.dist.all_gather_into`` on gloo: every rank's part lands in every rank's buffer, in groups that are
not the world (group ranks are not global ranks) and with several gathers in flight at once."""

from __future__ import annotations

import torch

from tests.spawn import spawn


def _gather() -> dict[str, list[float]]:
    import torch.distributed as dist

    from adapter.runtime.dist import all_gather_into

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    pair = dist.new_group([0, 2])  # every rank makes it; ranks 0 and 2 are its ranks 0 and 1

    def buffer(ranks: list[int], n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        flat = torch.full((len(ranks) * n,), -1.0)
        parts = list(flat.split(n))
        parts[ranks.index(rank)].copy_(100 * rank + torch.arange(n))  # this rank's part: 100 × its global rank + i
        return flat, parts

    gathers = {"world_a": ([0, 1, 2], 5, None, 0), "world_b": ([0, 1, 2], 3, None, 1)}
    if rank != 1:
        gathers["pair"] = ([0, 2], 4, pair, 0)
    flats, requests = {}, []
    for name, (ranks, n, group, tag) in gathers.items():  # all started before any is waited on
        flats[name], parts = buffer(ranks, n)
        requests += all_gather_into(flats[name], parts, group or dist.group.WORLD, tag=tag)
    for request in requests:
        request.wait()
    return {name: flat.tolist() for name, flat in flats.items()}


def test_all_gather_into_fills_every_part_on_gloo():
    results = spawn(_gather, 3, timeout=120)
    for rank, got in enumerate(results):
        assert got["world_a"] == [100 * r + i for r in range(3) for i in range(5)], rank
        assert got["world_b"] == [100 * r + i for r in range(3) for i in range(3)], rank
        if rank != 1:
            assert got["pair"] == [100 * r + i for r in (0, 2) for i in range(4)], rank
