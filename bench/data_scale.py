"""Benchmark: the training data pipeline at pre-training scale (1M, 10M and 100M samples per run).

The index cost depends on the ``.meta`` files, not on token data, so the bench writes metas only: samples of
50 to 2000 tokens (uniform, mean 1025: 100M samples are about 100B tokens), ``--per-file`` samples a file
under one data-type folder. Every file's ``.bin`` is a link to one small file holding one JSON line for
each length, and each meta row points at the line of its length, so every sample read has the length its
meta says. Per size, a fresh process builds one data-parallel rank's batches (``--dp`` ranks; seq_len 2048,
micro_bsz 2, so rows of 4096 tokens; micro_num 4) and reports:

* time to first batch: from ``build_train_batches`` to its first batch (the index is built in between), wall
  and CPU time of the process (the CPU time moves less on a shared machine);
* steady batches/s over the next ``--batches`` batches;
* peak memory: the process's peak resident set (``VmHWM``) minus its resident set after imports, also per
  sample (memory-mapped meta pages count while mapped);
* the sampler checkpoint: ``torch.save`` of its state (to the end of an ``fsync``), its size, and
  ``load_state_dict(torch.load(..., weights_only=True))`` of it (a restore).

``--repeat N`` reports the best of N runs (least time, most batches/s). ``--code DIR`` measures another
checkout's ``adapter`` package (e.g. ``git archive`` of an older commit).

    .venv/bin/python bench/data_scale.py --dir /tmp/data-scale [--sizes 1000000 10000000 100000000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MIN_LEN, MAX_LEN = 50, 2000
LINES = "lines.jsonl"  # one line per length, shared by every .bin


def write_lines(folder: Path) -> np.ndarray:
    """The shared token file; returns the byte offset of the line of each length (index: length - MIN_LEN)."""
    offsets, offset = [], 0
    with open(folder / LINES, "wb") as f:
        for n in range(MIN_LEN, MAX_LEN + 1):
            line = (json.dumps({"tokens": [1 + i % 1000 for i in range(n)]}) + "\n").encode()
            f.write(line)
            offsets.append(offset)
            offset += len(line)
    return np.array(offsets, dtype=np.int64)


def write_metas(folder: Path, samples: int, per_file: int) -> None:
    """``samples`` meta rows in files of ``per_file`` under ``folder/en``, each ``.bin`` a link to the lines."""
    if (folder / "done").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    line_offsets = write_lines(folder)
    (folder / "en").mkdir(exist_ok=True)
    rng = np.random.RandomState(0)
    for index, start in enumerate(range(0, samples, per_file)):
        lengths = rng.randint(MIN_LEN, MAX_LEN + 1, size=min(per_file, samples - start)).astype(np.int64)
        path = folder / "en" / f"part_{index:05d}.bin"
        with open(f"{path}.meta", "wb") as f:
            np.save(f, np.stack([line_offsets[lengths - MIN_LEN], lengths], axis=1))
        if not path.exists():
            path.symlink_to(Path("..") / LINES)
    (folder / "done").write_text(f"{samples} samples\n")


def _rss_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key)).split()[1])


def measure(folder: Path, dp: int, batches: int, workers: int) -> dict:
    """One rank's numbers (run in a fresh process, so that its peak memory is its own)."""
    import torch

    from adapter.config import RawConfig, normalize
    from adapter.data.loader import build_train_batches

    raw = {"model_type": "INTERNLM", "adam": {"lr": 1e-4}, "ckpt": {"enable_save_ckpt": False},
           "model": {"num_layers": 1, "hidden_size": 64, "num_attention_heads": 1, "vocab_size": 1024},
           "data": {"seq_len": 2048, "micro_bsz": 2, "micro_num": 4, "total_steps": 1,
                    "train_folder": str(folder)}}
    cfg = normalize(RawConfig(raw, "bench.py", {})).data
    base = _rss_kib("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    kwargs = {"num_workers": workers} if workers else {}  # older checkouts have no num_workers
    sampler, stream = build_train_batches(cfg, 0, dp, **kwargs)
    next(stream)
    first, first_cpu = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    steady = batches / (time.perf_counter() - start)
    peak = _rss_kib("VmHWM")
    path = folder / "sampler.pt"
    start = time.perf_counter()
    torch.save(sampler.state_dict(), path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    save = time.perf_counter() - start
    start = time.perf_counter()
    sampler.load_state_dict(torch.load(path, weights_only=True))
    load = time.perf_counter() - start
    return {"first_batch_s": first, "first_batch_cpu_s": first_cpu, "batches_per_s": steady, "peak_mib": (peak - base) / 1024,
            "rss_after_imports_mib": base / 1024, "rows": sampler.num_samples, "sampler_save_s": save,
            "sampler_mib": path.stat().st_size / 2**20, "sampler_load_s": load}


def measure_in_child(args: argparse.Namespace, folder: Path) -> dict:
    child = subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--measure", str(folder),
                            "--dp", str(args.dp), "--batches", str(args.batches), "--workers", str(args.workers)],
                           env={**os.environ, "PYTHONPATH": str(args.code)}, capture_output=True, text=True)
    if child.returncode:
        sys.exit(f"{folder}: the measuring process failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000])
    parser.add_argument("--per-file", type=int, default=1_000_000)
    parser.add_argument("--dp", type=int, default=8)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="best of this many runs (times: least; rates: most)")
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose adapter package is measured")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the per-size child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.dp, args.batches, args.workers)))
        return
    print("| samples | files | rows | first batch (CPU) | batches/s | peak memory | bytes/sample | sampler save | "
          "sampler size | sampler load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for samples in args.sizes:
        folder = args.dir / f"{samples}_{args.per_file}"
        write_metas(folder, samples, args.per_file)
        runs = [measure_in_child(args, folder) for _ in range(args.repeat)]
        r = {key: (max if key == "batches_per_s" else min)(run[key] for run in runs) for key in runs[0]}
        files = -(-samples // args.per_file)
        print(f"| {samples:,} | {files} | {r['rows']:,} | {r['first_batch_s']:.2f} s ({r['first_batch_cpu_s']:.2f} s) "
              f"| {r['batches_per_s']:.0f} | {r['peak_mib']:,.0f} MiB | {r['peak_mib'] * 2**20 / samples:.1f} | "
              f"{r['sampler_save_s']:.2f} s | {r['sampler_mib'] * 1024:,.0f} KiB | {r['sampler_load_s']:.2f} s |",
              flush=True)


if __name__ == "__main__":
    main()
