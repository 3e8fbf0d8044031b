"""CPU benchmark: the adapter's training step against a bare loop over the same model, schedule and data.

The adapter step is ``train.engine.Trainer.train_step`` (DeepSpeed ZeRO-1 + megatron-core's schedule, with
InternEvo's schedules). The bare step runs the same megatron-core schedule on an identical copy of the model
and updates it with ``torch.optim.AdamW`` (gradients averaged over data parallel with one all-reduce per
tensor, as a minimal hand-written loop would). Both run in the same processes, alternating step by step
(and which of the two goes first), so machine noise hits both alike. Reported: median step times, and the
median and quartiles of the per-step ratio adapter / bare (each adapter step against the bare step run
next to it, which cancels slow drifts of the machine).

    .venv/bin/python bench/train_overhead.py [--steps 24] [--hidden 256] [--seq 512]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def _config(layout_name: str, hidden: int, seq: int, world: int):
    from adapter.config import RawConfig, normalize, validate
    from tests.conftest import base_sections

    s = base_sections()
    pp, vpp = (2, 2) if layout_name == "pp2_vpp2" else (1, 1)
    s["model"].update(num_layers=8, hidden_size=hidden, num_attention_heads=8, vocab_size=4096, num_chunks=vpp)
    s["data"].update(seq_len=seq, micro_bsz=1, micro_num=4 if pp == 1 else 8, total_steps=1000)
    s["parallel"] = dict(tensor=1, pipeline=dict(size=pp, interleaved_overlap=True))
    # InternEvo's default bucket (the tests' 1024 elements would make DeepSpeed reduce tensor by tensor)
    s["hybrid_zero_optimizer"]["reduce_bucket_size"] = 512 * 1024 * 1024
    cfg = normalize(RawConfig(s, "bench.py", {}))
    return cfg, validate(cfg, world)


def _worker(layout_name: str, steps: int, hidden: int, seq: int) -> dict | None:
    from megatron.core import parallel_state as ps

    from adapter.config.to_mcore import model_options, transformer_config
    from adapter.model.build import build_model_chunks
    from adapter.model.forward import run_microbatches
    from adapter.runtime.dist import init_distributed
    from adapter.train.engine import Trainer
    from tests.model.workers import random_batches

    cfg, layout = _config(layout_name, hidden, seq, int(os.environ["WORLD_SIZE"]))
    init_distributed(layout)
    torch.manual_seed(0)
    adapter_cfg = transformer_config(cfg, layout, use_cpu_initialization=True)
    adapter_chunks = build_model_chunks(adapter_cfg, model_options(cfg))
    trainer = Trainer(cfg, layout, adapter_chunks, adapter_cfg)
    bare_cfg = transformer_config(cfg, layout, use_cpu_initialization=True)
    bare_chunks = build_model_chunks(bare_cfg, model_options(cfg))
    params = [p for c in bare_chunks for p in c.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    dp_group = ps.get_data_parallel_group()
    dp = ps.get_data_parallel_world_size()

    def bare_step(batches):
        opt.zero_grad(set_to_none=True)
        run_microbatches(bare_chunks, batches, bare_cfg, forward_only=False)
        if dp > 1:
            for p in params:
                dist.all_reduce(p.grad, group=dp_group)
                p.grad /= dp
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    batches = random_batches(0, count=cfg.data.micro_num, length=seq, vocab=4096)
    steps_fns = (("adapter", trainer.train_step), ("bare", bare_step))
    times: dict[str, list[float]] = {"adapter": [], "bare": []}
    for step in range(steps + 3):
        for name, fn in steps_fns if step % 2 else steps_fns[::-1]:  # alternate which goes first
            dist.barrier()
            start = time.perf_counter()
            fn(batches)
            dist.barrier()
            if step >= 3:  # warm-up steps excluded
                times[name].append(time.perf_counter() - start)
    if dist.get_rank() != 0:
        return None
    a, b = statistics.median(times["adapter"]), statistics.median(times["bare"])
    pairs = sorted(x / y for x, y in zip(times["adapter"], times["bare"]))
    return {"layout": layout_name, "adapter_s": a, "bare_s": b, "ratio": statistics.median(pairs),
            "ratio_iqr": [pairs[len(pairs) // 4], pairs[3 * len(pairs) // 4]], "ratio_of_medians": a / b,
            "steps": steps, "tokens_per_step": cfg.data.micro_num * seq * dp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args()
    from tests.spawn import spawn

    results = [spawn(_worker, 2, name, args.steps, args.hidden, args.seq)[0] for name in ("dp2", "pp2_vpp2")]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
