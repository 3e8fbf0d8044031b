"""Benchmark: converting a 7B-shaped InternEvo checkpoint, against copying the same bytes.

The bench writes an InternLM-7B-shaped checkpoint (random bf16 weights; tp=2, pp=2) into ``--dir``, times
``cp -r`` of it on the same disk (before and after the conversions; the faster copy is the baseline), then
converts it with ``internlm-ckpt`` (a fresh process each time) to megatron-core's ``torch_dist`` (``mcore``,
loadable at any layout), to Megatron's per-rank layout at tp=4, pp=2, vpp=2 (``mcore-legacy``), to one
InternEvo file (tp=1, pp=1: an output file four times the largest source shard), to Hugging Face safetensors,
and the ``torch_dist`` and HF exports back to InternEvo at tp=2, pp=2 (those formats as sources).
Reported: wall time (process start to the end of a ``sync``, as the copy is timed up to its ``sync``) as a
ratio to the copy, and peak resident memory (``VmHWM`` of the converting process) as a ratio to the
largest source shard. Goal: time <= 1.5x the copy, memory <= 1x the largest shard.

    .venv/bin/python bench/convert.py --dir /tmp/convert-bench [--layers 32]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from adapter.checkpoint.formats.internevo import model_config_dict, shard_state_dict  # noqa: E402
from adapter.config import RawConfig, normalize  # noqa: E402


def model_7b(layers: int):
    raw = {"model_type": "INTERNLM", "adam": {"lr": 1e-4}, "ckpt": {"enable_save_ckpt": False},
           "data": {"seq_len": 2048, "micro_bsz": 1, "total_steps": 1},
           "model": {"num_layers": layers, "hidden_size": 4096, "num_attention_heads": 32, "vocab_size": 103168,
                     "mlp_ratio": 8 / 3, "dtype": "torch.bfloat16"}}
    return normalize(RawConfig(raw, "7b.py", {})).model


def write_source(folder: Path, model, tp: int, pp: int) -> None:
    from adapter.checkpoint.convert import target_layout
    from adapter.model.mapping import logical_shapes

    layout = target_layout(model, tp, pp, 1)
    meta = {k: torch.empty(s, dtype=torch.bfloat16, device="meta") for k, s in logical_shapes(model).items()}
    folder.mkdir(parents=True)
    for p in range(pp):
        for t in range(tp):
            shard = shard_state_dict(meta, model, layout, t, p)
            # seeded by stage and key: the replicas of a replicated tensor (norms) are equal, as every reader
            # checks (a random copy per file would be refused as a differing replica)
            torch.save({k: torch.randn(v.shape, dtype=torch.bfloat16,
                                       generator=torch.Generator().manual_seed(zlib.crc32(f"{p}/{k}".encode())))
                        for k, v in shard.items()}, folder / f"model_tp{t}_pp{p}.pt")
    torch.save(model_config_dict(model), folder / "model_config.pt")


def run(cmd: list[str]) -> dict:
    # peak RSS from /proc/self/status VmHWM: it belongs to this process's own address space, whereas Linux
    # carries ru_maxrss over from the forking parent (this bench, which held a source shard) across exec
    code = ("import runpy, sys, time; sys.argv = %r; t = time.perf_counter(); rc = 0\n"
            "try:\n    runpy.run_module('adapter.cli.ckpt', run_name='__main__')\n"
            "except SystemExit as e:\n    rc = e.code or 0\n"
            "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0].split()[1]\n"
            "print('RESULT', time.perf_counter() - t, int(hwm) * 1024, rc)"
            ) % (["internlm-ckpt", *cmd],)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    subprocess.run(["sync"])  # the output on disk, as for the copy
    wall = time.perf_counter() - start
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    if not line or line[0].split()[3] != "0":
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
    _, seconds, rss, _ = line[0].split()
    return {"seconds": float(seconds), "process_wall_s": wall, "peak_rss_bytes": int(rss)}


def copy(src: Path, dst: Path) -> float:
    """Seconds for ``cp -r`` plus ``sync`` (the copy is removed afterwards)."""
    subprocess.run(["sync"])
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync"])
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--reuse", action="store_true", help="keep an existing DIR/src from an earlier run")
    args = parser.parse_args()
    model = model_7b(args.layers)
    src = args.dir / "src"
    if not (args.reuse and src.exists()):
        shutil.rmtree(args.dir, ignore_errors=True)
        write_source(src, model, tp=2, pp=2)
    total = sum(f.stat().st_size for f in src.iterdir())
    largest = max(f.stat().st_size for f in src.iterdir())
    first_copy = copy(src, args.dir / "copy")
    results = {"source_bytes": total, "largest_shard_bytes": largest}
    conversions = {}
    exports = {"dist": ["--to", "mcore"], "hf": ["--to", "hf"]}  # kept as the sources of the last two
    targets = (("mcore torch_dist", src, "dist", exports["dist"]),
               ("mcore-legacy tp4 pp2 vpp2", src, "legacy", ["--to", "mcore-legacy", "--tp", "4", "--pp", "2", "--vpp", "2"]),
               ("internevo tp1 pp1", src, "internevo", ["--to", "internevo", "--tp", "1", "--pp", "1"]),
               ("hf", src, "hf", exports["hf"]),
               ("torch_dist -> internevo tp2 pp2", args.dir / "dist", "back", ["--to", "internevo", "--tp", "2", "--pp", "2"]),
               ("hf -> internevo tp2 pp2", args.dir / "hf", "back", ["--to", "internevo", "--tp", "2", "--pp", "2"]))
    for name, source, folder, flags in targets:
        conversions[name] = run(["convert", str(source), str(args.dir / folder), *flags])
        if folder not in exports:
            shutil.rmtree(args.dir / folder, ignore_errors=True)
    for folder in exports:
        shutil.rmtree(args.dir / folder, ignore_errors=True)
    # the virtual disk's speed drifts: the copy is timed before and after, and the faster one is the baseline
    results["copy_s"] = [first_copy, copy(src, args.dir / "copy")]
    copy_s = min(results["copy_s"])
    for name, r in conversions.items():
        r["time_ratio"] = r["process_wall_s"] / copy_s
        r["memory_ratio"] = r["peak_rss_bytes"] / largest
        results[name] = r
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
