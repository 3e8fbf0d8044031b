"""Run a function in several local processes with a gloo rendezvous, and collect what each returns.

Each worker gets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` (a free port picked
by binding port 0) exactly as torchrun or the deepspeed launcher would set them, so the code under test
runs its normal start-up path. Results travel back through ``torch.save`` files; a worker's exception is
re-raised in the caller with the worker's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

#: hides every GPU from a worker, so that it takes the CPU path (gloo, the CPU shim, DeepSpeed's CPU accelerator)
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world_size: int, port: int, out_dir: str, args: tuple,
           env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    path = Path(out_dir) / f"rank{rank}.pt"
    try:
        result = fn(*args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # report everything, including assertion errors, to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _failed(out_dir: Path, rank: int) -> bool:
    path = out_dir / f"rank{rank}.pt"
    try:
        return path.exists() and not torch.load(path, weights_only=False)["ok"]
    except Exception:  # still being written
        return False


def _wait(procs: list, out_dir: Path, timeout: float) -> None:
    """Join all workers; once one has failed, stop the others (they would hang in a collective)."""
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(not p.is_alive() and (p.exitcode != 0 or _failed(out_dir, r)) for r, p in enumerate(procs)):
            time.sleep(2)  # let the others report their own errors if they can
            break
        time.sleep(0.1)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()


def spawn(fn: Callable, world_size: int, *args: Any, timeout: float = 600,
          env: dict[str, str] | None = None) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` ranks; returns each rank's return value, in rank order.

    ``env`` is set in each worker before ``fn`` runs (and before CUDA is first touched there), e.g.
    ``CPU_ONLY`` to run the CPU path on a machine that has a GPU."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(fn, rank, world_size, port, out_dir, args, env or {}))
                 for rank in range(world_size)]
        for p in procs:
            p.start()
        _wait(procs, Path(out_dir), timeout)
        results = []
        for rank, p in enumerate(procs):
            path = Path(out_dir) / f"rank{rank}.pt"
            if not path.exists():
                raise RuntimeError(f"rank {rank} died without a result (exit code {p.exitcode})")
            record = torch.load(path, weights_only=False)  # written by our own workers just now
            if not record["ok"]:
                raise RuntimeError(f"rank {rank} failed:\n{record['error']}")
            results.append(record["result"])
        return results
