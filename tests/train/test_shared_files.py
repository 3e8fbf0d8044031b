"""Files written by several data-parallel ranks together (``train.shared_files``): against ``torch.save``'s
bytes, and what a failure on any rank leaves behind (nothing)."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from adapter.train.shared_files import even_shares, owners
from tests.spawn import spawn


def _content() -> "OrderedDict[str, torch.Tensor]":
    g = torch.Generator().manual_seed(3)
    return OrderedDict(a=torch.randn(64, 32, generator=g), b=torch.randn(7, generator=g).bfloat16(),
                       c=torch.randn(5, 9, generator=g), d=torch.arange(12))


def _write(folder: str) -> list[str]:
    """In each of two ranks: the scenarios below, each with what every rank raised ("" for nothing)."""
    import torch.distributed as dist

    from adapter.train.shared_files import File, Rows, Together

    dist.init_process_group("gloo")
    rank, root = dist.get_rank(), Path(folder)
    content = _content()
    skeleton = OrderedDict((k, torch.empty(v.shape, dtype=v.dtype, device="meta")) for k, v in content.items())
    mine = {0: ["a", "d"], 1: ["b", "c"]}[rank]

    def attempt(path: Path, names: list[str], creator: int = 1, bad: bool = False) -> str:
        try:
            together = Together([File(path, skeleton, creator)], None)
            give = {n: content[n] for n in names}
            if path.name == "ok.pt":  # tensor a in two blocks of rows, one from each rank
                give["a"] = Rows(40 * rank, content["a"][40 * rank:40 + 24 * rank])
            if bad:
                give["c"] = give["c"].t()  # the wrong shape
            together.write(0, give)
            together.close()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return ""

    out = [attempt(root / "ok.pt", mine + (["a"] if rank == 1 else []))]
    out.append(attempt(root / "bad.pt", mine, bad=rank == 1))
    out.append(attempt(root / "missing" / "x.pt", mine))  # the creator cannot create it
    out.append(attempt(root / "twice.pt", mine + (["a"] if rank == 1 else [])))  # owners that overlap
    # ranks on two nodes, each seeing its own folder (object storage's staging): the creator writes it all,
    # and rank 0, whose disk does not have the file, must not touch it
    from adapter.train import shared_files

    node = root / f"node{rank}"
    node.mkdir()
    def elsewhere(path, *_):
        raise FileNotFoundError(path)  # what opening it would meet on the other node

    if rank == 0:
        shared_files.write_records = elsewhere
    out.append(attempt(node / "alone.pt", list(content) if rank == 1 else []))
    return out


@pytest.mark.multiproc
def test_files_written_together(tmp_path):
    """Rank 0 writes a tensor and the first rows of another, rank 1 (the creator) the rest: ``torch.save``'s
    very bytes. A rank that fails to write its part, a creator that cannot create the file, or two ranks
    writing one tensor: every rank raises (the failing rank its own error, the other one naming it) and no
    file is left. A rank with nothing to write never opens the file, which may be on another node's disk."""
    results = spawn(_write, 2, str(tmp_path))
    (tmp_path / "ref").mkdir()
    torch.save(_content(), tmp_path / "ref" / "ok.pt")  # the same archive name inside: the file's stem
    assert (tmp_path / "ok.pt").read_bytes() == (tmp_path / "ref" / "ok.pt").read_bytes()
    assert [r[0] for r in results] == ["", ""]
    assert results[1][1].startswith("RuntimeError: bad.pt: c (9, 5)")
    assert results[0][1].startswith("CheckpointError: ") and "rank 1 could not write" in results[0][1]
    assert "missing" in results[1][2] and "rank 1 could not write" in results[0][2]
    assert all(r[3].startswith("RuntimeError: ") and "twice.pt: a: the ranks wrote bytes [(0, 8192), (0, 8192)] of 8192"
               in r[3] for r in results)
    assert [r[4] for r in results] == ["", ""] and os.listdir(tmp_path / "node0") == []
    torch.save(_content(), tmp_path / "ref" / "alone.pt")
    assert (tmp_path / "node1" / "alone.pt").read_bytes() == (tmp_path / "ref" / "alone.pt").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["node0", "node1", "ok.pt", "ref"]  # no temporary file left


def test_owners_follow_the_partitions():
    """A unit goes to the rank holding most of its elements (ties to the lower rank), only among the ranks
    allowed to write; ``even_shares`` cuts parameters laid end to end into equal ranges."""
    assert even_shares([4, 6, 2], 2) == [[4, 2, 0], [0, 4, 2]]
    assert even_shares([3], 3) == [[1], [1], [1]]
    units = [((0, 0), [0]), ((0, 1), [1, 2])]
    held = even_shares([4, 6, 2], 2)  # unit 1 holds 2 + 0 on rank 0, 4 + 2 on rank 1
    both = owners(units, held, [0, 1])
    assert both.units == {(0, 0): 0, (0, 1): 1} and both.params == [0, 1, 1]
    assert both.of(1) == {(0, 1)}
    assert owners(units, held, [1]).params == [1, 1, 1]  # one writer: it owns everything
    assert owners([((0, 0), [0])], [[2], [2]], [0, 1]).units == {(0, 0): 0}  # a tie
