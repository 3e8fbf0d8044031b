"""Benchmark: saving and loading a whole training checkpoint, the adapter's format against DeepSpeed's own.

For each layout (``--layouts``, e.g. ``dp2,tp2_pp2``) a set of processes (gloo on the CPU, or with ``--gpu`` NCCL
and one GPU a rank; consecutive layouts of one world size share them, megatron's groups made anew) builds the
model, takes one optimizer step (so Adam has state) and then, ``--repeats`` times, measures on that same trained
state:

* (a) ``ours save``: ``train.state_files.save_checkpoint`` (InternEvo model files, the layout-free optimizer
  state under ``optimizer/``, context, sampler, marker);
* (b) ``DeepSpeed save``: the engine's own ``save_checkpoint`` (module states plus each rank's ZeRO partition),
  what earlier versions wrote under ``deepspeed/``;
* (c) ``ours load``: what a resume does: ``load_training_state`` of (a), whose fp32 master weights give the
  model's (``load_model_weights`` only where a checkpoint holds no optimizer state);
* (d) ``DeepSpeed load``: the engine's ``load_checkpoint`` of (b), as resuming an old checkpoint does;

A repeat runs (a) (b) (b) (a), then (c) (d) (d) (c), so that neither side profits from its place in the order
(on this shared machine a phase measured right after another one varied by up to 3×). Before each load the
model, ZeRO's fp32 partitions and Adam's moments are zeroed, and after it they are compared with the saved
state, so a load that did nothing cannot pass. Then, in the same processes, from the checkpoint the previous
layout saved (resharding), as (e) (f) (f) (e):

* (e) ``ours load, resharded``: the same two calls on a checkpoint of another layout;
* (f) ``read the files once``: every file of that checkpoint ``torch.load``-ed into memory once, the files
  dealt out to the ranks by size (the job's I/O floor for reading it; no slicing, no optimizer);

and, as (g) (h) (h) (g), what a run that starts from that checkpoint's weights alone does:

* (g) ``ours weights-only start, resharded``: ``load_model_weights`` (the module's weights from the model
  files, cut for this layout), checked against the weights (e) restored;
* (h) ``read the model files once``: (f) for the model files only.

Time: wall time on rank 0 from a barrier before to a barrier after (so the slowest rank counts); the median
over every run of a phase, and for ours the median over repeats of (its two runs) / (the baseline's two).
Each save is followed (untimed) by an ``fsync`` of every file it wrote, timed as ``+ fsync``, and then its
pages are dropped from the page cache (``posix_fadvise(DONTNEED)``, which needs no privileges; ``mincore``
checks it), so loads and reads start from a cold page cache. Memory: each rank's peak resident set during
the phase (``VmHWM``, reset before it through ``/proc/self/clear_refs``, after ``malloc_trim`` has returned
freed heap) minus its resident set before; the table shows the largest rank. The resident set counts tensors
and the checkpoint pages a process maps (the lazy reader maps files), which is what the machine must hold;
``tracemalloc`` sees neither. Bytes: what each save left on disk.

    .venv/bin/python bench/ckpt_state.py [--layouts dp2,tp2_pp2] [--hidden 512] [--layers 4] [--vocab 8192]
                                         [--dtype fp32|bf16] [--gpu] [--repeats 3] [--profile]
                                         [--out runs/bench_ckpt_state]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

PHASES = ("ours_save", "ds_save", "ours_load", "ds_load", "ours_reshard", "read_once", "ours_weights", "read_model")
LABELS = {"ours_save": "(a) ours save", "ds_save": "(b) DeepSpeed save", "ours_load": "(c) ours load",
          "ds_load": "(d) DeepSpeed load", "ours_reshard": "(e) ours load, resharded",
          "read_once": "(f) read the files once", "ours_weights": "(g) ours weights-only start, resharded",
          "read_model": "(h) read the model files once"}
DS_TAG = "deepspeed"
DTYPES = {"fp32": "torch.float32", "bf16": "torch.bfloat16"}
ABBA = ("ours", "ds", "ds", "ours")


def parse_layout(name: str) -> dict[str, int]:
    """``dp2``, ``tp2_pp2``, ``pp2_vpp2``... as sizes (unnamed ones are 1); the world is tp × pp × dp."""
    sizes = {"tp": 1, "pp": 1, "vpp": 1, "dp": 1}
    for part in name.split("_"):
        m = re.fullmatch(r"(tp|pp|vpp|dp)(\d+)", part)
        if m is None:
            raise ValueError(f"layout {name!r}: parts are tp<N>, pp<N>, vpp<N>, dp<N> joined by '_'")
        sizes[m[1]] = int(m[2])
    return sizes


def _world(layout_name: str) -> int:
    p = parse_layout(layout_name)
    return p["tp"] * p["pp"] * p["dp"]


def _config(layout_name: str, sizes: dict, root: Path):
    from adapter.config import RawConfig, normalize, validate
    from tests.conftest import base_sections

    p = parse_layout(layout_name)
    s = base_sections()
    s["model"].update(num_layers=sizes["layers"], hidden_size=sizes["hidden"],
                      num_attention_heads=max(8, sizes["hidden"] // 128), vocab_size=sizes["vocab"],
                      num_chunks=p["vpp"], dtype=DTYPES[sizes["dtype"]])
    s["data"].update(seq_len=sizes["seq"], micro_bsz=1, micro_num=2 * p["pp"], total_steps=100)
    s["parallel"] = dict(zero1=-1, tensor=dict(size=p["tp"], mode="mtp"),
                         pipeline=dict(size=p["pp"], interleaved_overlap=True))
    s["ckpt"] = dict(enable_save_ckpt=True, save_ckpt_folder=f"local:{root}", checkpoint_every=100)
    cfg = normalize(RawConfig(s, "bench.py", {}))
    return cfg, validate(cfg, int(os.environ["WORLD_SIZE"]))


# ---- page cache and memory

_libc = ctypes.CDLL(None, use_errno=True)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def flush_and_drop(folder: Path) -> None:
    """``fsync`` every file under ``folder``, then drop its pages from the page cache."""
    for path in _files(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(folder: Path) -> float:
    """The share of ``folder``'s pages in the page cache (``mincore`` over a read-only mapping)."""
    cached = total = 0
    page = mmap.PAGESIZE
    for path in _files(folder):
        size = path.stat().st_size
        if not size:
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            view = np.frombuffer(m, dtype=np.uint8)
            _libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec)
            del view
            cached += int((np.frombuffer(vec, dtype=np.uint8) & 1).sum())
            total += pages
    return cached / total if total else 0.0


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class Phase:
    """Times one collective phase (barrier to barrier) and this rank's peak resident set during it; on a GPU
    also the peak of GPU memory allocated during it beyond what was allocated before (``gpu_extra``)."""

    def __enter__(self) -> "Phase":
        import gc

        gc.collect()
        _libc.malloc_trim(0)  # freed heap goes back to the system: the resident set before is what is live
        self.gpu = torch.cuda.is_available()
        if self.gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.gpu0 = torch.cuda.memory_allocated()
        dist.barrier()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        self.rss0 = _status("VmRSS")
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            if self.gpu:
                torch.cuda.synchronize()
            dist.barrier()
        self.seconds = time.perf_counter() - self.start
        self.peak = _status("VmHWM")
        self.extra = self.peak - self.rss0
        self.gpu_extra = torch.cuda.max_memory_allocated() - self.gpu0 if self.gpu else None


# ---- the trained state

class _Sampler:
    def state_dict(self) -> dict:
        return {"bench": True}


def _snapshot(trainer) -> dict[str, list[torch.Tensor]]:
    """Clones of what a checkpoint restores on this rank: module weights, ZeRO's fp32 partitions, Adam's moments."""
    zero = trainer.optimizer
    adam = zero.optimizer
    flats = [g["params"][0] for g in adam.param_groups]
    return {"module": [p.detach().clone() for c in trainer.chunks for p in c.parameters()],
            "fp32": [t.detach().clone() for t in zero.single_partition_of_fp32_groups],
            "exp_avg": [adam.state[f]["exp_avg"].clone() for f in flats],
            "exp_avg_sq": [adam.state[f]["exp_avg_sq"].clone() for f in flats]}


def _zero_state(trainer) -> None:
    zero = trainer.optimizer
    adam = zero.optimizer
    with torch.no_grad():
        for c in trainer.chunks:
            for p in c.parameters():
                p.zero_()
        for t in zero.single_partition_of_fp32_groups:
            t.zero_()
        for g in adam.param_groups:
            for key in ("exp_avg", "exp_avg_sq"):
                adam.state[g["params"][0]][key].zero_()


def _check_state(trainer, expected: dict[str, list[torch.Tensor]], what: str) -> None:
    got = _snapshot(trainer)
    for key, tensors in expected.items():
        if not all(torch.equal(a, b) for a, b in zip(got[key], tensors)):
            raise AssertionError(f"{what}: {key} differs from the saved state after the load")


def _relink_optimizer_state(trainer) -> None:
    """After DeepSpeed's ``load_checkpoint`` its parameters' links to Adam's state are rebuilt empty and are
    filled at the next step, but only at a process's first step (``_hp_optimizer_states_linked``); this
    bench loads after a step and saves again without one, so it fills them as that step would (untimed)."""
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    zero = trainer.optimizer
    for i, _ in enumerate(zero.optimizer.param_groups):
        lazy_init_hp_params_optimizer_state(zero.bit16_groups[i], zero.single_partition_of_fp32_groups[i],
                                            zero.optimizer.state)


def _my_files(folder: Path, models_only: bool = False) -> list[Path]:
    """This rank's share of ``folder``'s files (``models_only``: its model files): dealt out largest first, each
    to the rank with fewest bytes."""
    rank, world = dist.get_rank(), dist.get_world_size()
    loads = [0] * world
    mine = []
    files = sorted(folder.glob("model_*.pt")) if models_only else _files(folder)
    for path in sorted(files, key=lambda p: (-p.stat().st_size, str(p))):
        r = loads.index(min(loads))
        loads[r] += path.stat().st_size
        if r == rank:
            mine.append(path)
    return mine


def _read_once(folder: Path, models_only: bool = False) -> None:
    """``torch.load`` this rank's share of ``folder``'s files into memory."""
    for path in _my_files(folder, models_only):
        torch.load(path, weights_only=True)  # read whole, then dropped


def _share(folder: Path, models_only: bool = False) -> int:
    return sum(p.stat().st_size for p in _my_files(folder, models_only))


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in _files(folder))


def _worker(jobs: list[tuple[str, bool, str | None]], sizes: dict, root: str, repeats: int,
            profile: str | None = None) -> list[dict] | None:
    """Each job ``(layout, same, reshard_from)`` in turn in these processes (``_layout_run``); rank 0's results."""
    results = [_layout_run(name, sizes, root, repeats, same, reshard_from, profile)
               for name, same, reshard_from in jobs]
    return results if dist.get_rank() == 0 else None


def _layout_run(layout_name: str, sizes: dict, root: str, repeats: int, same: bool,
                reshard_from: str | None, profile: str | None = None) -> dict | None:
    """``same``: phases (a)-(d) at this layout; ``reshard_from``: (e), (f) from that layout's checkpoint.
    With ``profile`` (a folder), every rank's runs of ours are profiled into
    ``<profile>/<layout>_<phase>_r<rank>.pstats`` (which slows them: time with the table, not these)."""
    import cProfile

    from adapter.config.to_mcore import model_options, transformer_config
    from adapter.model.build import build_model_chunks
    from adapter.model.mapping import logical_shapes
    from adapter.runtime.dist import device, init_distributed
    from adapter.train.engine import Trainer
    from adapter.train.state_files import (load_model_weights, load_training_state, save_checkpoint,
                                           weights_from_optimizer)
    from tests.model.workers import random_batches

    root_path = Path(root)
    cfg, layout = _config(layout_name, sizes, root_path)
    init_distributed(layout)
    torch.manual_seed(0)
    tcfg = transformer_config(cfg, layout, use_cpu_initialization=True)
    chunks = build_model_chunks(tcfg, model_options(cfg))
    trainer = Trainer(cfg, layout, chunks, tcfg)
    batches = random_batches(0, count=cfg.data.micro_num, length=cfg.data.seq_len, vocab=cfg.model.vocab_size)
    trainer.train_step([b.to(device()) for b in batches])
    saved = _snapshot(trainer)
    params = sum(torch.Size(s).numel() for s in logical_shapes(cfg.model).values())
    rank0 = dist.get_rank() == 0
    here = root_path / layout_name
    records: list[dict] = []

    def record(phase: str, repeat: int, ph: Phase, **extra) -> None:
        if rank0:
            print(f"[ckpt_state] {layout_name} {phase} #{repeat}: {ph.seconds:.2f} s, peak +{ph.extra / 2**20:.0f} MiB",
                  file=sys.stderr, flush=True)
        records.append({"phase": phase, "repeat": repeat, "seconds": ph.seconds, "peak": ph.peak,
                        "extra": ph.extra, "gpu_extra": ph.gpu_extra, **extra})

    def drop(folder: Path) -> None:
        """fsync + drop the page cache of ``folder`` (rank 0), timed; checked with mincore."""
        dist.barrier()
        start = time.perf_counter()
        if rank0:
            flush_and_drop(folder)
        dist.barrier()
        return time.perf_counter() - start

    def load_ours(folder: Path) -> None:  # what a resume does (checkpointing.Checkpointer.load_weights, load_state)
        if not weights_from_optimizer(folder, True):  # else the weights come from the fp32 masters
            load_model_weights(folder, cfg, layout, chunks, "bench")
        load_training_state(folder, cfg, layout, trainer, True, "bench")

    def cold(folder: Path) -> float:
        drop(folder)
        return cached_fraction(folder) if rank0 else 0.0

    profiles: dict[str, cProfile.Profile] = {}

    def timed(phase: str, repeat: int, fn, **extra) -> None:
        profiler = profiles.setdefault(phase, cProfile.Profile()) if profile and phase.startswith("ours") else None
        with Phase() as ph:
            if profiler is not None:
                profiler.runcall(fn)
            else:
                fn()
        record(phase, repeat, ph, **extra)

    def load_ds(folder: Path) -> None:
        trainer.deepspeed.load_checkpoint(str(folder), tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=False, load_module_strict=False)

    for repeat in range(repeats if same else 0):
        # each repeat runs ours and DeepSpeed's as A B B A, so that neither profits from going first or last
        folders = {who: [here / f"{who}{repeat}_{k}" for k in range(2)] for who in ("ours", "ds")}

        def save(who: str, folder: Path) -> None:
            if who == "ours":
                save_checkpoint(folder, cfg, layout, trainer, _Sampler(), {}, step=1)
            else:
                trainer.deepspeed.save_checkpoint(str(folder), tag=DS_TAG, save_latest=False)

        for k, who in enumerate(ABBA):  # (a), (b)
            folder = folders[who][k // 2]
            timed(f"{who}_save", repeat, lambda: save(who, folder))
            records[-1].update(fsync=drop(folder), bytes=_bytes(folder) if rank0 else 0)
        for k, who in enumerate(ABBA):  # (c), (d), each from a cold page cache and a zeroed state
            folder = folders[who][k // 2]
            left = cold(folder)
            _zero_state(trainer)
            timed(f"{who}_load", repeat, lambda: (load_ours if who == "ours" else load_ds)(folder), cached=left)
            if who == "ds":
                _relink_optimizer_state(trainer)
            _check_state(trainer, saved, f"{who} load at {layout_name}")
        dist.barrier()
        if rank0:  # keep one of ours for the next layout's resharded load
            for folder in folders["ds"] + folders["ours"][1:] + folders["ours"][:1] * (repeat < repeats - 1):
                shutil.rmtree(folder)
        dist.barrier()
    if reshard_from is not None:  # (e), (f): another layout's checkpoint
        source = root_path / reshard_from / f"ours{repeats - 1}_0"
        for repeat in range(repeats):
            for who in ("ours", "read", "read", "ours"):
                left = cold(source)
                if who == "ours":
                    timed("ours_reshard", repeat, lambda: load_ours(source), cached=left)
                else:
                    timed("read_once", repeat, lambda: _read_once(source), cached=left, bytes=_share(source))
        restored = _snapshot(trainer)["module"]
        for repeat in range(repeats):  # (g), (h)
            for who in ("ours", "read", "read", "ours"):
                left = cold(source)
                if who == "ours":
                    _zero_state(trainer)
                    timed("ours_weights", repeat, lambda: load_model_weights(source, cfg, layout, chunks, "bench"),
                          cached=left)
                    if not all(torch.equal(a, b) for a, b in zip(_snapshot(trainer)["module"], restored)):
                        raise AssertionError(f"weights-only start at {layout_name}: the weights differ from (e)'s")
                else:
                    timed("read_model", repeat, lambda: _read_once(source, True), cached=left,
                          bytes=_share(source, True))
    for phase, profiler in profiles.items():
        Path(profile).mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(Path(profile) / f"{layout_name}_{phase}_r{dist.get_rank()}.pstats")
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    if not rank0:
        return None
    return {"layout": layout_name, "world": dist.get_world_size(), "params": params, "reshard_from": reshard_from,
            "records": [dict(r, rank=rank) for rank, recs in enumerate(gathered) for r in recs]}


# ---- the table

#: what each of ours is measured against, repeat by repeat
BASELINE = {"ours_save": "ds_save", "ours_load": "ds_load", "ours_reshard": "read_once",
            "ours_weights": "read_model"}


def summarise(run: dict) -> dict[str, dict]:
    """Per phase: rank 0's times (barrier to barrier: the slowest rank) and their median, the median
    ``fsync`` after a save, the largest rank's peak added resident set, bytes; for ours, the median of the
    per-repeat ratios to the baseline run next to it (which cancels slow drifts of a shared machine)."""
    out: dict[str, dict] = {}
    for phase in PHASES:
        recs = [r for r in run["records"] if r["phase"] == phase]
        if not recs:
            continue
        rank0 = [r for r in recs if r["rank"] == 0]
        out[phase] = {
            "seconds": statistics.median(r["seconds"] for r in rank0),
            "seconds_all": [r["seconds"] for r in rank0],
            "fsync": statistics.median(r["fsync"] for r in rank0) if "fsync" in rank0[0] else None,
            "extra": max(r["extra"] for r in recs),
            "gpu_extra": max((r["gpu_extra"] for r in recs if r.get("gpu_extra") is not None), default=None),
            "peak": max(r["peak"] for r in recs),
            "bytes": (statistics.median(r["bytes"] for r in rank0) if phase.endswith("save")
                      else sum({r["rank"]: r["bytes"] for r in recs}.values()) if phase.startswith("read")
                      else None),
            "cached": max((r.get("cached", 0.0) for r in rank0), default=0.0),
        }
    for phase, base in BASELINE.items():
        if phase in out and base in out:
            def per_repeat(name: str) -> dict[int, float]:
                totals: dict[int, float] = {}
                for r in run["records"]:
                    if r["phase"] == name and r["rank"] == 0:
                        totals[r["repeat"]] = totals.get(r["repeat"], 0.0) + r["seconds"]
                return totals

            ours, theirs = per_repeat(phase), per_repeat(base)
            out[phase]["ratios"] = [ours[k] / theirs[k] for k in sorted(ours)]
            out[phase]["ratio"] = statistics.median(out[phase]["ratios"])
    return out


def _mb(n: float | None) -> str:
    return "" if n is None else f"{n / 2**20:,.0f} MiB"


def table(runs: list[dict]) -> str:
    summaries = [summarise(run) for run in runs]
    gpu = any(v["gpu_extra"] is not None for s in summaries for v in s.values())
    rows = ["| layout | phase | time: median (range) | × baseline | save + fsync | peak RSS added | "
            + "peak GPU memory added | " * gpu + "bytes |", "|---|---|---|---|---|---|" + "---|" * gpu + "---|"]
    for run, summary in zip(runs, summaries):
        for phase, v in summary.items():
            resharded = phase in ("ours_reshard", "read_once", "ours_weights", "read_model")
            name = f"{run['reshard_from']} → {run['layout']}" if resharded else run["layout"]
            ratio = f"**{v['ratio']:.2f}**" if "ratio" in v else ""
            fsync = f"{v['seconds'] + v['fsync']:.2f} s" if v["fsync"] is not None else ""
            rows.append(f"| {name} | {LABELS[phase]} | {v['seconds']:.2f} s ({min(v['seconds_all']):.2f}–"
                        f"{max(v['seconds_all']):.2f}) | {ratio} | {fsync} | {_mb(v['extra'])} | "
                        + f"{_mb(v['gpu_extra'])} | " * gpu + f"{_mb(v['bytes'])} |")
    return "\n".join(rows) + "\n"


def machine(gpu: bool = False) -> str:
    import deepspeed

    load = os.getloadavg()
    gpus = f", {torch.cuda.device_count()} × {torch.cuda.get_device_name()}" if gpu else ""
    return (f"{platform.node() or 'host'}: {os.cpu_count()} CPUs{gpus}, torch {torch.__version__}, DeepSpeed "
            f"{deepspeed.__version__}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default="dp2,tp2_pp2",
                        help="comma-separated; each loads the previous one's checkpoint resharded "
                             "(the first the last's)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the model's (Adam's state is fp32)")
    parser.add_argument("--gpu", action="store_true",
                        help="one rank per GPU on NCCL (layouts of at most as many ranks as GPUs) instead of the "
                             "CPU; the table adds each phase's peak GPU memory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=None, help="where checkpoints are written (default: a folder in --out)")
    parser.add_argument("--out", default="runs/bench_ckpt_state")
    parser.add_argument("--profile", action="store_true",
                        help="profile ours on every rank into <out>/profile/*.pstats (read with python -m pstats)")
    args = parser.parse_args(argv)
    from tests.spawn import CPU_ONLY, spawn

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sizes = dict(hidden=args.hidden, layers=args.layers, vocab=args.vocab, seq=args.seq, dtype=args.dtype)
    layouts = args.layouts.split(",")
    if args.gpu and max(map(_world, layouts)) > torch.cuda.device_count():
        parser.error(f"--gpu: layouts {args.layouts} need up to {max(map(_world, layouts))} ranks, one per GPU; "
                     f"this machine has {torch.cuda.device_count()} GPUs")
    before = machine(args.gpu)
    jobs = [(name, True, layouts[i - 1] if i > 0 else None) for i, name in enumerate(layouts)]
    if len(layouts) > 1:  # the first layout loads the last one's checkpoint
        jobs.append((layouts[0], False, layouts[-1]))
    runs: list[dict] = []
    while jobs:  # consecutive jobs of one world size share processes (megatron's groups are made anew)
        world = _world(jobs[0][0])
        batch = [jobs.pop(0)]
        while jobs and _world(jobs[0][0]) == world:
            batch.append(jobs.pop(0))
        runs += spawn(_worker, world, batch, sizes, str(work), args.repeats,
                      str(out.resolve() / "profile") if args.profile else None, env=None if args.gpu else CPU_ONLY,
                      timeout=3600)[0]
    text = table(runs)
    after = machine(args.gpu)
    result = {"sizes": sizes, "repeats": args.repeats, "machine_before": before, "machine_after": after,
              "runs": runs, "summary": [summarise(r) for r in runs]}
    cached = max(v["cached"] for r in result["summary"] for v in r.values())
    header = (f"Checkpoint save/load, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: "
              f"{runs[0]['params']:,} parameters, {args.dtype} on the {'GPU' if args.gpu else 'CPU'}; {args.repeats} "
              f"repeats; before each load at most "
              f"{cached:.1%} of its files were in the page cache\n"
              f"before: {before}\nafter: {after}\n\n")
    (out / "ckpt_state.md").write_text(header + text)
    (out / "ckpt_state.json").write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    print(header + text)
    return result


if __name__ == "__main__":
    main()
