"""GPU benchmark: tokens/s, MFU and peak memory of the adapter's training step against plain megatron-core.

The two setups of ``bench/gpu_setups.py`` (the adapter: DeepSpeed ZeRO-1 over megatron-core's schedule;
plain megatron-core: its DDP and distributed optimizer) train the same layers on the same data and batch,
one after the other in the same processes (one per GPU, data parallel). Per setup: a few warm-up steps, then
timed steps (each between a device synchronisation and a barrier); reported are the median step time,
tokens/s over all ranks, model TFLOPS per GPU and MFU (``adapter.train.metrics``: matmul FLOPs, causal
attention over the packed pieces, recompute not counted), the peak memory the setup added (on the CPU, the
process's resident set instead), and the losses of its first and last steps (equal first losses: the same
weights and data).

Default sizes: InternLM-7B's layer (hidden 4096, 32 heads, MLP 11008, vocabulary 103168), 4 layers, rows of
4096 tokens, 8 micro-batches per step and GPU, bf16, no recompute. ``--cpu-smoke``: tiny sizes on the CPU
(gloo, 2 processes), the whole path in seconds, so that it cannot rot (a test runs it).

    bash bench/gpu.sh                         # installs, runs pytest -m gpu, then this
    python bench/gpu.py [--layers 4] [--steps 10] [--peak-tflops 989] [--out runs/bench_gpu]
    python bench/gpu.py --setups adapter --profile     # also: where one step's device time goes
    python bench/gpu.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from adapter.config import RawConfig, normalize, validate  # noqa: E402

#: dense bf16 peak TFLOPS of one device, by a part of its name (vendor data sheets, SXM parts)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0}

SIZES = {
    "gpu": dict(hidden=4096, heads=32, layers=4, vocab=103168, seq=4096, micro_num=8, warmup=3, steps=10),
    "cpu_smoke": dict(hidden=64, heads=4, layers=2, vocab=256, seq=64, micro_num=2, warmup=1, steps=2),
}


def bench_config(sizes: dict, world: int):
    """The benchmark's InternEvo config: InternLM1 (the 7B demo's family), bf16, tp=1, pp=1, dp=world."""
    from tests.conftest import base_sections

    s = base_sections()
    s["model"].update(num_layers=sizes["layers"], hidden_size=sizes["hidden"], num_attention_heads=sizes["heads"],
                      vocab_size=sizes["vocab"], dtype="torch.bfloat16", checkpoint=False, use_flash_attn=True)
    s["data"].update(seq_len=sizes["seq"], micro_bsz=1, micro_num=sizes["micro_num"], total_steps=1000)
    s["adam"].update(lr=3e-4)
    s["lr_scheduler"].update(total_steps=1000, warmup_ratio=0.01)
    s["hybrid_zero_optimizer"]["reduce_bucket_size"] = 512 * 1024 * 1024  # InternEvo's default
    s["parallel"] = dict(zero1=-1, tensor=1, pipeline=1)
    cfg = normalize(RawConfig(s, "bench_gpu.py", {}))
    return cfg, validate(cfg, world)


def _batches(cfg, seed: int):
    """This rank's micro-batches: one packed row of ``seq_len`` tokens each, one piece (a full causal row)."""
    from adapter.model.forward import MicroBatch
    from adapter.runtime.dist import device

    g = torch.Generator().manual_seed(seed)
    seq, vocab = cfg.data.seq_len, cfg.model.vocab_size
    cu = torch.tensor([0, seq], dtype=torch.int32)
    return [MicroBatch(torch.randint(0, vocab, (1, seq), generator=g), torch.randint(0, vocab, (1, seq), generator=g),
                       cu).to(device()) for _ in range(cfg.data.micro_num)]


def _timed_step(setup, batches) -> tuple[float, float]:
    torch.cuda.synchronize()  # a no-op on the CPU (adapter.runtime.cpu)
    dist.barrier()
    start = time.perf_counter()
    loss = setup.step(batches)
    torch.cuda.synchronize()
    dist.barrier()
    return time.perf_counter() - start, loss


def _measure(name: str, cfg, layout, batches, sizes: dict, profile: str | None) -> dict:
    from bench.gpu_setups import SETUPS

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    setup = SETUPS[name](cfg, layout, seed=1234)
    losses, times = [], []
    for step in range(sizes["warmup"] + sizes["steps"]):
        seconds, loss = _timed_step(setup, batches)
        losses.append(loss)
        if step >= sizes["warmup"]:
            times.append(seconds)
    peak = torch.cuda.max_memory_allocated() - base
    if profile:
        _profile_step(setup, batches, Path(profile) / f"profile_{name}.txt")
    result = {"setup": setup.name, "optimizer": setup.optimizer_name, "step_s": statistics.median(times),
              "step_s_all": times, "losses": losses, "peak_memory_bytes": peak}
    del setup
    return result


def _profile_step(setup, batches, path: Path) -> None:
    """One more step under torch's profiler; rank 0 writes the operators that took the most device time
    (where a step's time goes, for the MFU gap)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        _timed_step(setup, batches)
    if dist.get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        sort = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        path.write_text(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70),
                        encoding="utf-8")


def _worker(sizes: dict, setups: list[str], profile: str | None = None) -> dict | None:
    from megatron.core import parallel_state as ps

    from adapter.runtime.dist import device, init_distributed
    from adapter.train.batches import piece_lengths
    from adapter.train.metrics import flops_per_token, mean_attended_length

    cfg, layout = bench_config(sizes, int(os.environ["WORLD_SIZE"]))
    init_distributed(layout)
    batches = _batches(cfg, seed=ps.get_data_parallel_rank())
    results, failed = [], {}
    for name in setups:  # a setup that fails is reported, and the other still measured
        try:
            results.append(_measure(name, cfg, layout, batches, sizes, profile))
        except Exception as exc:  # noqa: BLE001 - reported in the table, and the exit status says so
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    peaks = torch.tensor([r["peak_memory_bytes"] for r in results], dtype=torch.float64, device=device())
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)  # the largest rank's
    if dist.get_rank() != 0:
        return None
    for r, peak in zip(results, peaks.tolist()):
        r["peak_memory_bytes"] = peak
    tokens = cfg.data.micro_num * cfg.data.seq_len * dist.get_world_size()
    flops = flops_per_token(cfg.model, mean_attended_length(piece_lengths(batches))) * tokens
    for r in results:
        r.update(tokens_per_step=tokens, tokens_per_s=tokens / r["step_s"],
                 tflops_per_device=flops / r["step_s"] / dist.get_world_size() / 1e12)
    return {"results": results, "failed": failed, "world": dist.get_world_size(), "device": _device_name(),
            "ffn_hidden": cfg.model.ffn_hidden_size, "attention": _attention(), "versions": _versions()}


def _versions() -> str:
    import deepspeed
    import megatron.core

    return f"torch {torch.__version__}, megatron-core {megatron.core.__version__}, DeepSpeed {deepspeed.__version__}"


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'unknown'})"


def _attention() -> str:
    from adapter.model import attention

    if attention.flash_attn_varlen_func is not None and torch.cuda.is_available():
        import flash_attn

        return f"flash-attn {flash_attn.__version__} (varlen)"
    return "torch SDPA per packed piece (flash-attn not installed)" if torch.cuda.is_available() else "torch SDPA (CPU)"


def peak_tflops(device: str, given: float | None) -> float | None:
    if given:
        return given
    return next((peak for part, peak in PEAK_TFLOPS.items() if part in device), None)


def markdown(run: dict, sizes: dict, peak: float | None) -> str:
    """The run as a BENCHMARKS.md section: what ran where, then one row per setup."""
    results = run["results"]
    lines = [
        f"Machine: {run['world']} × {run['device']}; {run['versions']}; attention: {run['attention']}; "
        f"{datetime.date.today().isoformat()}.",
        "",
        f"Model: {sizes['layers']} layers, hidden {sizes['hidden']}, {sizes['heads']} heads, MLP {run['ffn_hidden']}, "
        f"vocabulary {sizes['vocab']}, bf16, no recompute; {sizes['micro_num']} micro-batches of one "
        f"{sizes['seq']}-token row per GPU and step; warm-up steps {sizes['warmup']}, then the median of "
        f"{sizes['steps']} timed steps. MFU against {f'{peak:g} TFLOPS per device' if peak else 'no known peak (pass --peak-tflops)'}.",
        "",
        "| setup | optimizer | tokens/s | step | TFLOPS / GPU | MFU | peak memory | loss, first → last step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mfu = f"{r['tflops_per_device'] / peak:.1%}" if peak else "n/a"
        lines.append(f"| {r['setup']} | {r['optimizer']} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} s | "
                     f"{r['tflops_per_device']:.3g} | {mfu} | {r['peak_memory_bytes'] / 2**30:.2f} GiB | "
                     f"{r['losses'][0]:.4f} → {r['losses'][-1]:.4f} |")
    for name, error in run.get("failed", {}).items():
        lines.append(f"| {name} | failed: {error} | | | | | | |")
    if len(results) == 2:
        lines += ["", f"adapter / megatron-core tokens/s: **{results[0]['tokens_per_s'] / results[1]['tokens_per_s']:.3f}**"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (gloo, 2 processes)")
    for key, value in SIZES["gpu"].items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"default {value} (GPU)")
    parser.add_argument("--nproc", type=int, help="processes (default: every visible GPU; 2 with --cpu-smoke)")
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOPS of one device, for MFU (default: "
                        "known for H100/H200/A100 by name)")
    parser.add_argument("--out", default="runs/bench_gpu", help="folder for gpu.md and gpu.json")
    parser.add_argument("--setups", default="adapter,megatron", help="which setups, comma-separated "
                        "(default: adapter,megatron)")
    parser.add_argument("--profile", action="store_true", help="after the timed steps, profile one more step "
                        "per setup and write the top operators by device time to OUT/profile_<setup>.txt")
    args = parser.parse_args(argv)
    mode = "cpu_smoke" if args.cpu_smoke else "gpu"
    if mode == "gpu" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu-smoke, or on a GPU machine")
    sizes = {k: getattr(args, k) or v for k, v in SIZES[mode].items()}
    nproc = args.nproc or (2 if args.cpu_smoke else torch.cuda.device_count())
    from tests.spawn import CPU_ONLY, spawn

    setups = [name.strip() for name in args.setups.split(",") if name.strip()]
    if not setups or not set(setups) <= {"adapter", "megatron"}:
        parser.error(f"--setups: {args.setups!r}: choose from adapter, megatron")
    run = spawn(_worker, nproc, sizes, setups, str(Path(args.out).resolve()) if args.profile else None, timeout=420,
                env=CPU_ONLY if args.cpu_smoke else None)[0]
    peak = peak_tflops(run["device"], args.peak_tflops)
    text = markdown(run, sizes, peak)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.md").write_text(text, encoding="utf-8")
    (out / "gpu.json").write_text(json.dumps({"sizes": sizes, "peak_tflops": peak, **run}, indent=2), encoding="utf-8")
    print(f"written: {out / 'gpu.md'}, {out / 'gpu.json'}")
    return 1 if run["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
