"""Code that runs inside spawned ranks for the model tests (importable by the spawn start method)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from adapter.config import RawConfig, normalize, validate
from tests.conftest import base_sections

#: name → (tensor, pipeline, virtual stages, sequence parallel, InternEvo model.checkpoint)
LAYOUTS = {
    "reference": (1, 1, 1, False, False),
    "tp2": (2, 1, 1, False, False),
    "tp2_sp": (2, 1, 1, True, False),
    "pp2": (1, 2, 1, False, False),
    "pp2_vpp2_uneven": (1, 2, 2, False, False),
    "pp2_vpp2_uneven_recompute": (1, 2, 2, False, 0.5),
    "pp4_uneven": (1, 4, 1, False, False),
    "tp2_sp_pp2_vpp2_recompute": (2, 2, 2, True, True),
}
NUM_LAYERS = 6


def tiny_config(family: str, tp: int = 1, pp: int = 1, vpp: int = 1, sp: bool = False, world_size: int = 1,
                dtype: str = "torch.float32", checkpoint: bool | float = False):
    s = base_sections()
    s["model"].update(num_layers=NUM_LAYERS, num_chunks=vpp, dtype=dtype, checkpoint=checkpoint)
    if family == "internlm2":
        s["model_type"] = "INTERNLM2_PUBLIC"
        s["model"].update(num_kv_attention_heads=2, no_bias=True, rope_base=1e6)
    elif family == "llama2":  # GQA with the attention biases InternEvo's LLAMA2 has by default
        s["model_type"] = "LLAMA2"
        s["model"].update(num_kv_attention_heads=2)
    s["parallel"] = dict(zero1=-1, tensor=dict(size=tp, mode="msp" if sp else "mtp"),
                         pipeline=dict(size=pp, interleaved_overlap=True))
    cfg = normalize(RawConfig(s, f"tiny_{family}.py", {}))
    return cfg, validate(cfg, world_size)


def random_logical(model, seed: int) -> dict[str, torch.Tensor]:
    """Random weights large enough that attention, rotary and every bias matter."""
    from adapter.model.mapping import logical_shapes, model_units

    embedding = model_units(model)[0][0]
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in logical_shapes(model).items():
        t = torch.randn(shape, generator=g)
        if "norm" in key:
            t = 1 + 0.1 * t
        elif len(shape) == 1:
            t = 0.1 * t
        else:
            t = t * (0.5 / shape[1] ** 0.5) if key != embedding else t * 0.5
        out[key] = t
    return out


def random_batches(seed: int, count: int = 4, length: int = 32, vocab: int = 128):
    """Packed rows with random piece boundaries and some unlabelled tokens."""
    from adapter.model.forward import MicroBatch

    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (1, length), generator=g)
        labels = torch.randint(0, vocab, (1, length), generator=g)
        cuts = sorted(set(torch.randint(1, length, (3,), generator=g).tolist()))
        cu = torch.tensor([0, *cuts, length], dtype=torch.int32)
        labels[0, cu[1:] - 1] = -100  # no label at each piece's end, as InternEvo's packing does
        batches.append(MicroBatch(ids, labels, cu))
    return batches


def _gather_to_rank0(obj):
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs if dist.get_rank() == 0 else None


def run_layout(family: str, name: str, seed: int = 0) -> dict | None:
    """Build ``family`` in layout ``name`` with the same weights and batches as every other layout; return
    (on rank 0) the logits and losses of a forward pass and the gradients of a backward pass, in logical form."""
    from megatron.core import parallel_state as ps

    from adapter.config.to_mcore import model_options, transformer_config
    from adapter.model.build import build_model_chunks
    from adapter.model.forward import run_microbatches
    from adapter.model.mapping import chunk_state_dict, logical_from_chunk, model_state
    from adapter.runtime.dist import init_distributed

    tp, pp, vpp, sp, checkpoint = LAYOUTS[name]
    cfg, layout = tiny_config(family, tp, pp, vpp, sp, world_size=int(os.environ["WORLD_SIZE"]),
                              checkpoint=checkpoint)
    init_distributed(layout)
    config = transformer_config(cfg, layout, use_cpu_initialization=True)
    chunks = build_model_chunks(config, model_options(cfg))
    logical = random_logical(cfg.model, seed)
    pp_rank, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    for vp, chunk in enumerate(chunks):
        missing, unexpected = chunk.load_state_dict(chunk_state_dict(logical, cfg.model, layout, pp_rank, vp, tp_rank),
                                                    strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    batches = random_batches(seed)

    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        reports = run_microbatches(chunks, batches, config, forward_only=True, keep_logits=True)
    for chunk in chunks:
        chunk.train()
        chunk.zero_grad(set_to_none=True)
    train_reports = run_microbatches(chunks, batches, config, forward_only=False)

    # sequence parallelism leaves partial norm gradients on each tensor rank (the trainer reduces them)
    for chunk in chunks:
        for p in chunk.parameters():
            if getattr(p, "sequence_parallel", False) and tp > 1:
                dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    grads = {}
    for vp, chunk in enumerate(chunks):
        local = {k: p.grad.detach().clone() for k, p in chunk.named_parameters()}
        local = {k: v for k, v in local.items() if k in model_state(chunk)}
        shards = [None] * tp
        dist.all_gather_object(shards, local, group=ps.get_tensor_model_parallel_group())
        if tp_rank == 0 and ps.get_data_parallel_rank() == 0:
            grads.update(logical_from_chunk(shards, cfg.model, layout, pp_rank, vp))
    last = ps.is_pipeline_last_stage() and tp_rank == 0 and ps.get_data_parallel_rank() == 0
    mine = {
        "grads": grads,
        "logits": [r["logits"] for r in reports] if last else None,
        "losses": [float(r["loss"]) for r in reports] if last else None,
        "train_losses": [float(r["loss"]) for r in train_reports] if last else None,
        "recomputed": {(pp_rank, vp): (c.decoder.config.recompute_num_layers or 0, len(c.decoder.layers))
                       for vp, c in enumerate(chunks)} if tp_rank == 0 else {},
    }
    gathered = _gather_to_rank0(mine)
    if gathered is None:
        return None
    merged = {"grads": {}, "logits": None, "losses": None, "train_losses": None, "recomputed": {}}
    for part in gathered:
        merged["grads"].update(part["grads"])
        merged["recomputed"].update(part["recomputed"])
        for key in ("logits", "losses", "train_losses"):
            if part[key] is not None:
                merged[key] = part[key]
    merged["weights"] = logical
    if name == "reference":
        merged.update(_reference_extras(chunks[0], batches[0], seed))
    return merged


def _reference_extras(chunk, batch, seed: int) -> dict:
    """Single-stage checks: logits of unpacked rows (for the HF oracle) and of each packed piece run alone."""
    from adapter.model.forward import packed_seq_params

    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(seed + 1))
    chunk.eval()
    with torch.no_grad():
        unpacked = chunk(tokens, None, None)
        packed = chunk(batch.input_ids, None, None, packed_seq_params=packed_seq_params(batch.cu_seqlens))
        row_causal = chunk(batch.input_ids, None, None)  # the same row, attention not cut
        bounds = batch.cu_seqlens.tolist()
        pieces = [chunk(batch.input_ids[:, a:b], None, None) for a, b in zip(bounds[:-1], bounds[1:])]
    return {"tokens": tokens, "unpacked_logits": unpacked, "packed_logits": packed, "piece_logits": pieces,
            "row_causal_logits": row_causal, "mcore_keys": list(chunk.state_dict()),
            "cu_seqlens": batch.cu_seqlens}


def run_fixture(family: str, fixture_dir: str, tp: int, pp: int) -> dict | None:
    """Load an InternEvo-written checkpoint into the layout (tp, pp) as a run starts from one (the weights
    only: ``load_model_weights``) and return the logits on its tokens."""
    from pathlib import Path

    from megatron.core import parallel_state as ps

    from adapter.config import load_config
    from adapter.config.to_mcore import model_options, transformer_config
    from adapter.model.build import build_model_chunks
    from adapter.model.forward import MicroBatch, run_microbatches
    from adapter.runtime.dist import init_distributed
    from adapter.train.state_files import load_model_weights

    raw = load_config(f"{fixture_dir}/config.py")
    raw.values["parallel"] = dict(tensor=dict(size=tp, mode="msp" if tp > 1 else "mtp"), pipeline=pp)
    cfg = normalize(raw)
    layout = validate(cfg, dist.get_world_size())
    init_distributed(layout)
    config = transformer_config(cfg, layout, use_cpu_initialization=True)
    chunks = build_model_chunks(config, model_options(cfg))
    load_model_weights(Path(fixture_dir) / "ckpt", cfg, layout, chunks, "test")
    for chunk in chunks:
        chunk.eval()
    tp_rank = ps.get_tensor_model_parallel_rank()
    tokens = torch.load(f"{fixture_dir}/tokens.pt", weights_only=True)
    batch = MicroBatch(tokens, torch.zeros_like(tokens))
    with torch.no_grad():
        reports = run_microbatches(chunks, [batch], config, forward_only=True, keep_logits=True)
    last = ps.is_pipeline_last_stage() and tp_rank == 0 and ps.get_data_parallel_rank() == 0
    gathered = _gather_to_rank0(reports[0]["logits"] if last else None)
    return None if gathered is None else next(x for x in gathered if x is not None)


def parity_matrix(families: list[str], names: list[str], fixtures: dict[str, str]) -> dict | None:
    """Every layout of ``names`` for every family, then each InternEvo fixture at tp=1 and at tp=2 × pp=2."""
    out = {}
    for family in families:
        for name in names:
            result = run_layout(family, name)
            if result is not None:
                out[(family, name)] = result
    for family, fixture_dir in fixtures.items():
        for tp, pp in ((1, 1), (2, 2)):
            logits = run_fixture(family, fixture_dir, tp, pp)
            if logits is not None:
                out[(family, f"fixture_tp{tp}_pp{pp}")] = logits
    return out if dist.get_rank() == 0 else None
