"""Megatron-LM's legacy per-rank checkpoint layout for the adapter's megatron-core model.

``<root>/iter_{N:07d}/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt`` holds ``{"model": state_dict}`` (or
``model0``, ``model1``, ... one per virtual stage), ``"iteration"`` and ``"checkpoint_version"``;
``<root>/latest_checkpointed_iteration.txt`` names the iteration. The pipeline suffix is present only when
the pipeline size is above 1, as Megatron-LM writes it. State-dict keys are megatron-core's
(``adapter.model.mapping.MCORE_NAMES``). Writing is ``stream_convert.mcore_legacy_groups``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from adapter.checkpoint.safe_load import load_tensors
from adapter.config.schema import ModelConfig
from adapter.model.mapping import logical_from_chunk
from adapter.runtime.layout import ParallelLayout, partition_uniform

RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")


def read_mcore_legacy(root: Path, model: ModelConfig) -> tuple[ParallelLayout, dict[str, torch.Tensor]]:
    """The saved layout and the logical tensors of the newest iteration under ``root``.

    The layer split is not stored in these files; it is taken to be InternEvo's partition, which is what
    the adapter's model uses (an even split when the layers divide evenly)."""
    latest = root / "latest_checkpointed_iteration.txt"
    folders = [root / f"iter_{int(latest.read_text().strip()):07d}"] if latest.exists() else sorted(root.glob("iter_*"))
    if not folders or not folders[-1].is_dir():
        raise ValueError(f"{root}: no iter_* folder")
    ranks = {}
    for d in folders[-1].iterdir():
        m = RANK_DIR.match(d.name)
        if m:
            ranks[(int(m[1]), int(m[2] or 0))] = d / "model_optim_rng.pt"
    if not ranks:
        raise ValueError(f"{folders[-1]}: no mp_rank_* folders")
    tp = max(t for t, _ in ranks) + 1
    pp = max(p for _, p in ranks) + 1
    missing = [rank_dir(t, p, pp) for t in range(tp) for p in range(pp) if (t, p) not in ranks]
    if missing:
        raise ValueError(f"{folders[-1]}: missing {', '.join(missing)}")
    first = load_tensors(ranks[(0, 0)], mmap=False)
    vpp = 1 if "model" in first else sum(1 for k in first if k.startswith("model") and k[5:].isdigit())
    layout = ParallelLayout(tp=tp, pp=pp, vpp=vpp, dp=None, zero1=None, sequence_parallel=False,
                            stages=tuple(tuple(s) for s in partition_uniform(model.num_layers, pp, vpp)))
    logical: dict[str, torch.Tensor] = {}
    for p in range(pp):
        files = [load_tensors(ranks[(t, p)], mmap=False) for t in range(tp)]
        for vp in range(vpp):
            key = "model" if vpp == 1 else f"model{vp}"
            logical.update(logical_from_chunk([f[key] for f in files], model, layout, p, vp))
    return layout, logical
